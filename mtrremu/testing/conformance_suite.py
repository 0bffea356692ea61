"""The conformance suite's tests (collected by :mod:`mtrremu.testing.conformance`, which
parametrises them over the strategies named with ``--mtrremu-strategy``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.errors import FailedPrecondition, RejectedHostWrite
from mtrremu.core.events import EventResult
from mtrremu.core.memtypes import MemType
from mtrremu.core.oracle import Gap, leaf_key_ranges
from mtrremu.core.units import GIB, KIB, MIB, PAGE_SHIFT
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager
from mtrremu.testing.cases import (
    CD0,
    CD1,
    CELLS,
    INVALID_WRITES,
    LEGAL_MTRR_TYPES,
    MIXED_SLOTS,
    Cell,
    InvalidWrite,
    program,
    q35_slots,
    set_deftype,
    set_fixed_all,
    set_var,
    var_mask,
)
from mtrremu.workloads import building

#: How many stale leaves a failure message lists.
SHOWN = 4


def new_vm(manager: PluginManager, strategy: str, **config: Any) -> Vm:
    """A VM with one non-coherent DMA device (so guest MTRRs count) and the oracle on."""
    config.setdefault("noncoherent_dma", 1)
    return manager.create_vm(VmConfig(track_staleness=True, **config), strategy)


def stale_leaves(vm: Vm, vcpu: int) -> str:
    report = vm.stale(vcpu, examples=SHOWN)
    shown = "; ".join(str(leaf) for leaf in report.examples)
    more = f" (+{report.count - len(report.examples)} more)" if report.count > SHOWN else ""
    return f"{report.count} stale leaves for vCPU {vcpu}: {shown}{more}"


def check_answer(strategy: str, result: EventResult) -> None:
    failure = result.strategy_failure
    assert failure is None, f"{strategy}: {failure} (the VM zapped everything in its place)"


def check_events(strategy: str, vm: Vm, what: str) -> None:
    """Fail if the VM's after-event oracle found a stale event; skip if a gap excused one."""
    log = vm.staleness
    if log.stale_events:
        raise AssertionError(
            f"{strategy}: {log.stale_events} event(s) left leaves newly stale for their vCPU "
            f"during {what}; the first: {log.first_stale_event}; now {stale_leaves(vm, 0)}"
        )
    if log.excused:
        gaps = ", ".join(f"{gap} ({n}x)" for gap, n in sorted(log.excused.items()))
        pytest.skip(f"not claimed: {strategy}'s declared gap(s) excuse what {what} left: {gaps}")


# -- cd-toggle: the seed patch's table cells ------------------------------------------------

SEED_SLOTS = q35_slots(8)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_cd_toggle_leaves_nothing_stale(
    mtrremu_manager: PluginManager, mtrremu_strategy: str, cell: Cell
) -> None:
    vm = new_vm(
        mtrremu_manager,
        mtrremu_strategy,
        quirk_cd_nw_cleared=cell.quirk,
        feature_mtrr=cell.feature_mtrr,
        memslots=SEED_SLOTS,
    )
    program(vm, cell)
    vm.write_cr0(0, CD1 if cell.to_cd == 0 else CD0, host=True)
    for slot in SEED_SLOTS:
        vm.fault_range(0, slot.base_gfn << PAGE_SHIFT, slot.end_gfn << PAGE_SHIFT)
    result = vm.write_cr0(0, CD1 if cell.to_cd else CD0)
    assert result.cd_toggled
    check_answer(mtrremu_strategy, result)
    check_events(mtrremu_strategy, vm, f"a guest CR0.CD {1 - cell.to_cd}->{cell.to_cd} toggle")
    assert vm.stale(0).clean, (
        f"{mtrremu_strategy}: the toggle left {stale_leaves(vm, 0)} (cell {cell.id})"
    )


# -- msr-validity: refused guest writes -----------------------------------------------------


@pytest.mark.parametrize("case", INVALID_WRITES, ids=lambda c: c.id)
def test_refused_write_changes_nothing(
    mtrremu_manager: PluginManager, mtrremu_strategy: str, case: InvalidWrite
) -> None:
    vm = new_vm(mtrremu_manager, mtrremu_strategy, memslots=SEED_SLOTS[:2])
    set_fixed_all(vm, 0, MemType.WB)
    set_var(vm, 0, 0, GIB, GIB, MemType.UC)
    set_deftype(vm, 0, 0xC06)
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, 2 * GIB)
    mtrrs, leaves = vm.vcpus[0].mtrr.snapshot(), vm.store.leaf_total
    result = vm.write_msr(0, case.msr, case.value)
    assert result.gp is not None, f"{case.id}: the write was accepted; KVM answers #GP"
    assert vm.vcpus[0].mtrr.snapshot() == mtrrs, f"{case.id}: a refused write changed MTRRs"
    zapped = result.zap is not None and result.zap.zap_event
    assert not zapped, f"{mtrremu_strategy}: a refused write ({case.id}) reached a zap path"
    assert vm.store.leaf_total == leaves, f"{mtrremu_strategy}: a refused write removed leaves"


# -- events and quiescence: random operation sequences -------------------------------------

SLOTS = MIXED_SLOTS
VCPUS = 2
TYPES = st.sampled_from(LEGAL_MTRR_TYPES)
FIXED_VALUES = st.one_of(
    TYPES.map(lambda t: int.from_bytes(bytes([t] * 8), "little")),
    st.lists(TYPES, min_size=8, max_size=8).map(lambda b: int.from_bytes(bytes(b), "little")),
)
BASES = (0, MIB, 2 * MIB, GIB, 2 * GIB, 3 * GIB, 0xE0000000, 4 * GIB, 6 * GIB)
SIZES = (4 * KIB, 2 * MIB, 256 * MIB, GIB, 2 * GIB, 4 * GIB)
DEFTYPES = st.sampled_from([0xC06, 0x806, 0xC00, 0x006, 0x000, 0xC05, 0x300])
MSR_WRITES = st.one_of(
    st.tuples(st.just(msrs.DEFTYPE), DEFTYPES),
    st.tuples(st.sampled_from(msrs.FIXED_MSRS[:4]), FIXED_VALUES),
    st.tuples(
        st.integers(0, 2).map(lambda p: msrs.PHYSBASE0 + 2 * p),
        st.builds(lambda b, t: b | t, st.sampled_from(BASES), TYPES),
    ),
    st.tuples(
        st.integers(0, 2).map(lambda p: msrs.PHYSBASE0 + 2 * p + 1),
        st.builds(
            lambda s, v: var_mask(s) & ~(0 if v else msrs.PHYSMASK_VALID),
            st.sampled_from(SIZES),
            st.booleans(),
        ),
    ),
)
GPAS = (0, 0x9F000, 0xC0000, MIB, 2 * MIB, GIB, 0xE0000000, 4 * GIB, 6 * GIB + 2 * MIB)
VCPU = st.integers(0, VCPUS - 1)
OPERATIONS = st.one_of(
    st.tuples(st.just("msr"), VCPU, MSR_WRITES, st.booleans()),
    st.tuples(st.just("cr0"), VCPU, st.sampled_from([CD0, CD1]), st.booleans()),
    st.tuples(st.just("access"), VCPU, st.sampled_from(GPAS), st.just(False)),
    st.tuples(st.just("fault"), VCPU, st.sampled_from(GPAS), st.just(False)),
    st.tuples(st.just("dma"), st.just(0), st.booleans(), st.just(False)),
)
Operation = tuple[str, int, Any, bool]


def play(vm: Vm, operations: Sequence[Operation]) -> None:
    """Firmware-like MTRRs on every vCPU (UC at [1 GiB, 2 GiB), WT at [4 GiB, 5 GiB), WB
    default, fixed ranges UC), memory touched, then ``operations`` (guest and host
    MSR and CR0 writes, accesses, bulk faults, DMA attach and detach)."""
    for vcpu in range(VCPUS):
        set_var(vm, vcpu, 0, GIB, GIB, MemType.UC)
        set_var(vm, vcpu, 1, 4 * GIB, GIB, MemType.WT)
        set_deftype(vm, vcpu, 0xC06)
        vm.write_cr0(vcpu, CD0)
    vm.fault_range(0, 0, 2 * GIB)
    for kind, vcpu, arg, host in operations:
        try:
            if kind == "msr":
                vm.write_msr(vcpu, arg[0], arg[1], host=host)
            elif kind == "cr0":
                vm.write_cr0(vcpu, arg, host=host)
            elif kind == "access":
                vm.access(vcpu, arg)
            elif kind == "fault":
                vm.fault_range(vcpu, arg, arg + 64 * MIB)
            elif arg:
                vm.attach_dma()
            else:
                vm.detach_dma()
        except (RejectedHostWrite, FailedPrecondition):
            pass  # a host write KVM refuses, a detach with nothing attached: nothing changed


def converge(vm: Vm) -> None:
    """Every vCPU reprograms the same MTRRs as firmware does: CD=1, MTRRs, defType, CD=0."""
    final = {msr: 0 for msr in msrs.VAR_MSRS}
    final.update({msr: building.WB_BYTES for msr in msrs.FIXED_MSRS})
    final[msrs.PHYSBASE0] = 3 * GIB
    final[msrs.PHYSBASE0 + 1] = var_mask(GIB)
    for vcpu in range(VCPUS):
        vm.write_cr0(vcpu, CD1)
        for msr, value in final.items():
            assert vm.write_msr(vcpu, msr, value).gp is None
        assert vm.write_msr(vcpu, msrs.DEFTYPE, 0xC06).gp is None
        vm.write_cr0(vcpu, CD0)


def operation_lists(steps: int) -> st.SearchStrategy[list[Operation]]:
    return st.lists(OPERATIONS, min_size=1, max_size=steps)


#: Sequences every run tries first, whatever the example count: the guest retypes memory with
#: CD=0 through MTRRdefType, a fixed MSR and a variable pair; CR0.CD set, both variable
#: ranges touched, CR0.CD cleared; the device detached; the same CD round trip on each vCPU.
ALWAYS = (
    [("msr", 0, (msrs.DEFTYPE, 0xC00), False)],
    [("msr", 0, (msrs.FIXED_MSRS[0], 0), False)],
    [("msr", 0, (msrs.PHYSBASE0 + 3, var_mask(GIB)), False)],
    [
        ("cr0", 0, CD1, False),
        ("fault", 0, GIB, False),
        ("fault", 0, 4 * GIB, False),
        ("cr0", 0, CD0, False),
    ],
    [("dma", 0, False, False)],
    [
        ("cr0", 0, CD1, False),
        ("cr0", 0, CD0, False),
        ("cr0", 1, CD1, False),
        ("fault", 1, GIB, False),
        ("cr0", 1, CD0, False),
    ],
)


def always(test: Any) -> Any:
    for operations in reversed(ALWAYS):
        test = example(operations=operations)(test)
    return test


def test_no_event_leaves_its_vcpu_stale(
    mtrremu_manager: PluginManager,
    mtrremu_strategy: str,
    mtrremu_settings: settings,
    mtrremu_steps: int,
) -> None:
    excused: set[str] = set()

    @mtrremu_settings
    @always
    @given(operations=operation_lists(mtrremu_steps))
    def run(operations: list[Operation]) -> None:
        vm = new_vm(mtrremu_manager, mtrremu_strategy, vcpus=VCPUS, memslots=SLOTS)
        play(vm, operations)
        log = vm.staleness
        assert not log.stale_events, (
            f"{mtrremu_strategy}: {log.stale_events} event(s) left leaves newly stale for "
            f"their vCPU; the first: {log.first_stale_event}"
        )
        excused.update(log.excused)

    run()
    if excused:
        pytest.skip(f"not claimed: declared gap(s) {', '.join(sorted(excused))} excused some")


def test_nothing_stale_at_quiescence(
    mtrremu_manager: PluginManager,
    mtrremu_strategy: str,
    mtrremu_settings: settings,
    mtrremu_steps: int,
) -> None:
    gaps = mtrremu_manager.strategy(mtrremu_strategy).spec.known_gaps

    @mtrremu_settings
    @always
    @given(operations=operation_lists(mtrremu_steps))
    def run(operations: list[Operation]) -> None:
        vm = new_vm(mtrremu_manager, mtrremu_strategy, vcpus=VCPUS, memslots=SLOTS)
        play(vm, operations)
        if not gaps:
            log = vm.staleness
            assert not log.stale_points, (
                f"{mtrremu_strategy}: {log.stale_points} quiescent point(s) with stale leaves "
                f"(at most {log.stale_leaves_max}); now {stale_leaves(vm, 0)}"
            )
        converge(vm)
        report = vm.stale_at_quiescence()
        assert report is not None
        keys = report.keys
        if Gap.STRADDLING_LEAF in gaps:
            _, pages = leaf_key_ranges(keys)
            keys = keys[pages == 1]  # patch 12 leaves huge leaves straddling a range's edge
        assert not len(keys), (
            f"{mtrremu_strategy}: after every vCPU reprogrammed the same MTRRs, "
            f"{stale_leaves(vm, 0)}"
        )

    run()
