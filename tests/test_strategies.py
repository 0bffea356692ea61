"""What each built-in strategy zaps for each event (docs/semantics.md#events-and-zaps,
docs/semantics.md#the-built-in-strategies)."""

from __future__ import annotations

import pytest

from mtrremu.core import msrs
from mtrremu.core.config import MAX_DMA_DEVICES, Memslot
from mtrremu.core.errors import InvalidConfig, ResourceExhausted
from mtrremu.core.memtypes import MemType
from mtrremu.core.strategy import Route
from mtrremu.core.units import ZAP_ALL, GfnRange, Level
from mtrremu.core.vm import Vm
from mtrremu.core.zap_list import Role
from tests.helpers import (
    CD0,
    CD1,
    FAITHFUL,
    GIB,
    MIB,
    SERIES,
    gfn,
    leaves,
    make_vm,
    q35_slots,
    set_deftype,
    set_fixed_all,
    set_var,
)

BASE1 = ("kvm-6.5", "kvm-6.7")
FIX4K_F0000 = 0x26E


def ready(strategy: str, cd: int = CD0, **config: object) -> Vm:
    """MTRRs enabled (WB default, FE=1, UC PCI hole) at CD=1, then CR0 set by the host."""
    vm = make_vm(strategy, **config)
    set_fixed_all(vm, 0, MemType.WB)
    set_var(vm, 0, 0, 3 * GIB, GIB, MemType.UC)
    set_deftype(vm, 0, 0xC06)
    vm.write_cr0(0, cd, host=True)
    return vm


def requested(vm: Vm, msr: int, value: int, host: bool = False) -> list[GfnRange] | None:
    result = vm.write_msr(0, msr, value, host=host)
    assert result.gp is None
    if result.zap is None or not result.zap.zap_event:
        return None
    return result.zap.requested


# -- MTRR writes -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [s for s in FAITHFUL if s != "kvm-6.11"])
@pytest.mark.parametrize("host", [False, True])
def test_deftype_write_at_cd0_zaps_all(strategy: str, host: bool) -> None:
    vm = ready(strategy)
    assert requested(vm, msrs.DEFTYPE, 0xC06, host) == [ZAP_ALL]


@pytest.mark.parametrize("strategy", [s for s in FAITHFUL if s != "kvm-6.11"])
def test_fixed_write_zaps_that_msrs_span_only_with_e_and_fe(strategy: str) -> None:
    vm = ready(strategy)
    span = GfnRange(gfn(0xF0000), gfn(0xF8000))
    assert requested(vm, FIX4K_F0000, 0) == [span]
    set_deftype(vm, 0, 0x806)  # FE=0
    assert requested(vm, FIX4K_F0000, 0) is None
    set_deftype(vm, 0, 0x006)  # E=0
    assert requested(vm, FIX4K_F0000, 0) is None


@pytest.mark.parametrize("strategy", [s for s in FAITHFUL if s != "kvm-6.11"])
def test_variable_write_zaps_the_stored_pair_span_v_ignored(strategy: str) -> None:
    vm = ready(strategy)
    # Base write under the old (1 GiB) mask: the span moves with the base.
    assert requested(vm, 0x200, 2 * GIB | MemType.UC) == [GfnRange(gfn(2 * GIB), gfn(3 * GIB))]
    # Clearing V still zaps the pair's span.
    assert requested(vm, 0x201, 0) == [GfnRange(gfn(2 * GIB), gfn(1 << 40))]
    # A pair whose mask was never written: the span wraps to empty, still a zap event.
    assert requested(vm, 0x202, 4 * GIB) == [GfnRange(gfn(4 * GIB), 0)]


@pytest.mark.parametrize("strategy", [s for s in FAITHFUL if s != "kvm-6.11"])
def test_range_writes_with_mtrrs_disabled_are_not_zap_events(strategy: str) -> None:
    vm = ready(strategy)
    set_deftype(vm, 0, 0x006)
    before = vm.counters.zap_events
    for msr in (*msrs.FIXED_MSRS, *msrs.VAR_MSRS):
        assert requested(vm, msr, 0) is None
    assert vm.counters.zap_events == before


@pytest.mark.parametrize("strategy", BASE1)
def test_base1_zaps_on_mtrr_writes_even_with_cd1(strategy: str) -> None:
    vm = ready(strategy, cd=CD1)
    assert requested(vm, msrs.DEFTYPE, 0xC06) == [ZAP_ALL]
    assert requested(vm, FIX4K_F0000, 0) == [GfnRange(gfn(0xF0000), gfn(0xF8000))]


@pytest.mark.parametrize("strategy", SERIES)
def test_base2_skips_mtrr_write_zaps_while_the_writer_has_cd1(strategy: str) -> None:
    vm = ready(strategy, cd=CD1)
    for msr, value in ((msrs.DEFTYPE, 0xC06), (FIX4K_F0000, 0), (0x200, 0)):
        assert requested(vm, msr, value) is None
    assert vm.counters.zaps_executed == 0


@pytest.mark.parametrize("strategy", FAITHFUL)
def test_pat_writes_never_zap(strategy: str) -> None:
    vm = ready(strategy)
    result = vm.write_msr(0, msrs.PAT, 0x0007040600070406)
    assert result.zap is None and result.counters.zap_events == 0


@pytest.mark.parametrize("strategy", FAITHFUL)
def test_no_zaps_while_mtrrs_are_not_honoured(strategy: str) -> None:
    vm = ready(strategy, noncoherent_dma=0)
    vm.fault_range(0, 0, GIB)
    set_deftype(vm, 0, 0xC00)
    vm.write_cr0(0, CD1)
    vm.write_cr0(0, CD0)
    assert vm.counters.zap_events == 0 and vm.counters.zaps_executed == 0
    assert all(byte == 0x80 | 0x08 | MemType.WB for _, _, byte in leaves(vm))


def test_kvm_611_never_zaps_on_mtrr_or_cd_events() -> None:
    vm = ready("kvm-6.11")
    vm.fault_range(0, 0, GIB)
    set_deftype(vm, 0, 0xC00)
    vm.write_cr0(0, CD1)
    vm.write_cr0(0, CD0)
    assert vm.counters.zap_events == 0
    assert vm.access(0, 3 * GIB + MIB).access is not None


# -- CD toggles --------------------------------------------------------------------------


@pytest.mark.parametrize("quirk", [True, False])
@pytest.mark.parametrize("strategy", BASE1)
def test_base1_cd_toggle_zaps_all_only_with_the_quirk_off(strategy: str, quirk: bool) -> None:
    vm = ready(strategy, cd=CD1, quirk_cd_nw_cleared=quirk)
    result = vm.write_cr0(0, CD0)
    assert result.cd_toggled
    if quirk:
        assert result.zap is None and result.counters.zap_events == 0
    else:
        assert result.zap is not None and result.zap.requested == [ZAP_ALL]


@pytest.mark.parametrize("strategy", ["zap-all", "zap-all-serialized"])
def test_base2_cd_toggles_zap_all_whatever_the_mtrrs(strategy: str) -> None:
    vm = ready(strategy, cd=CD1)
    for value in (CD0, CD1, CD0):
        result = vm.write_cr0(0, value)
        assert result.zap is not None and result.zap.requested == [ZAP_ALL]
    assert vm.counters.zap_events == 3


def test_cr0_writes_that_keep_cd_are_not_events() -> None:
    vm = ready("zap-all", cd=CD0)
    result = vm.write_cr0(0, CD0 | 0x80000000)  # PG on, CD unchanged
    assert not result.cd_toggled and result.zap is None


# -- routes and splitting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "route"),
    [
        ("kvm-6.5", None),
        ("zap-all", None),
        ("zap-all-serialized", Role.DRAINED),
        ("fine-grained", Role.DRAINED),
        ("fine-grained-split", Role.DRAINED),
    ],
)
def test_serialised_strategies_go_through_the_zap_list(strategy: str, route: Role | None) -> None:
    vm = ready(strategy)
    result = vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    assert result.zap is not None and result.zap.role is route
    assert (result.counters.drains, result.counters.ranges_queued) == ((1, 1) if route else (0, 0))
    assert result.counters.zaps_executed == 1


def test_split_cuts_general_path_ranges_into_memslot_parts() -> None:
    slots = q35_slots(8)
    vm = ready("fine-grained-split", memslots=slots)
    result = vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    assert result.zap is not None
    assert [t.range for t in result.zap.tickets] == [s.gfns for s in slots]
    assert result.counters.zaps_executed == len(slots)
    # A variable range partly outside memory: only the in-slot part is queued.
    result = vm.write_msr(0, 0x200, GIB | MemType.UC)  # [1 GiB, 2 GiB): inside slot 2 only
    assert result.zap is not None
    assert [t.range for t in result.zap.tickets] == [GfnRange(gfn(GIB), gfn(2 * GIB))]


def test_split_leaves_fine_grained_ranges_whole() -> None:
    vm = ready("fine-grained-split", cd=CD1, memslots=q35_slots(8))
    set_var(vm, 0, 1, 0, 16 * GIB, MemType.WT)  # spans every slot and the holes
    result = vm.write_cr0(0, CD0)
    assert result.zap is not None
    queued = [t.range for t in result.zap.tickets]
    assert GfnRange(0, gfn(16 * GIB)) in queued
    assert GfnRange(gfn(3 * GIB), gfn(4 * GIB)) in queued


def test_split_of_a_range_outside_every_slot_queues_nothing_but_still_drains() -> None:
    vm = ready("fine-grained-split", memslots=(Memslot.from_bytes(0, GIB),))
    result = vm.write_msr(0, 0x201, 0)  # pair 0 span [3 GiB, 2^40): no memory there
    assert result.zap is not None and result.zap.zap_event
    assert result.zap.tickets == [] and result.zap.role is Role.DRAINED
    assert result.counters.zaps_executed == 0


# -- DMA transitions ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", FAITHFUL)
def test_dma_0_to_1_and_1_to_0_zap_all_directly_others_do_not(strategy: str) -> None:
    vm = make_vm(strategy, noncoherent_dma=0)
    vm.fault_range(0, 0, GIB)
    first = vm.attach_dma()
    assert first.zap is not None and first.zap.requested == [ZAP_ALL]
    assert first.counters.dma_zap_events == 1 and first.counters.zap_events == 0
    assert vm.store.leaf_total == 0 and first.counters.drains == 0
    vm.fault_range(0, 0, GIB)
    second = vm.attach_dma()
    assert second.counters.zaps_executed == 0
    assert vm.detach_dma().counters.zaps_executed == 0
    last = vm.detach_dma()
    assert last.counters.zaps_executed == 1 and vm.store.leaf_total == 0


@pytest.mark.parametrize("strategy", ["kvm-6.5", "fine-grained"])
def test_dma_transitions_do_not_zap_without_ept(strategy: str) -> None:
    vm = make_vm(strategy, noncoherent_dma=0, tdp=False)
    vm.fault_range(0, 0, GIB)
    assert vm.attach_dma().counters.zaps_executed == 0
    assert vm.store.leaf_counts()[Level.G1] == 1


def test_route_enum_names_are_stable() -> None:
    assert [r.value for r in Route] == ["direct", "list", "mark"]


def test_the_dma_device_count_is_bounded() -> None:
    with pytest.raises(InvalidConfig):
        make_vm("zap-all", noncoherent_dma=MAX_DMA_DEVICES + 1)
    vm = make_vm("zap-all", noncoherent_dma=MAX_DMA_DEVICES)
    with pytest.raises(ResourceExhausted):
        vm.attach_dma()
    assert vm.noncoherent_dma == MAX_DMA_DEVICES
