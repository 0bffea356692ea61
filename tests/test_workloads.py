"""The workloads against the series' published numbers and the orderings its rows imply.

W1 (SeaBIOS) and W2 (OVMF) with 8 vCPUs and 16 GiB must reproduce the cover letter's zap
counts — 50/42 and 84/74 under the Base1/Base2 rules — because the traces follow the firmware,
and the counted work must order the rows as the published cycles do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from mtrremu.ab.runner import RunSpec, run
from mtrremu.core import cr0, msrs
from mtrremu.core.burst import execute
from mtrremu.core.counters import Counters
from mtrremu.core.errors import InvalidArgument
from mtrremu.core.events import Access, Burst, FaultRange, WriteCr0, WriteMsr
from mtrremu.core.vm import Vm
from mtrremu.workloads import WORKLOADS, build
from mtrremu.workloads.building import LINUX_CR0
from mtrremu.workloads.trace import Trace
from tests.helpers import SERIES, create_vm, serving


def replay(trace: Trace, strategy: str) -> tuple[Counters, Vm]:
    vm = create_vm(dataclasses.replace(trace.config, track_staleness=True), strategy)
    execute(vm, trace.items)
    return vm.counters_snapshot(), vm


@pytest.mark.parametrize(
    ("workload", "base1", "base2"), [("W1", 50, 42), ("W2", 84, 74)], ids=["SeaBIOS", "OVMF"]
)
def test_the_published_zap_counts(workload: str, base1: int, base2: int) -> None:
    trace = build(workload)  # defaults: 8 vCPUs, 16 GiB
    assert replay(trace, "kvm-6.5")[0].zap_events == base1
    for strategy in SERIES:
        assert replay(trace, strategy)[0].zap_events == base2, strategy


@pytest.mark.parametrize("vcpus", [1, 2, 4, 16])
def test_the_zap_counts_follow_the_docstring_formulas(vcpus: int) -> None:
    n = vcpus
    w1 = build("W1", {"vcpus": n, "ram": 4 << 30})
    assert replay(w1, "kvm-6.5")[0].zap_events == 6 * n + 2
    assert replay(w1, "zap-all")[0].zap_events == 5 * n + 2
    w2 = build("W2", {"vcpus": n, "ram": 4 << 30})
    assert replay(w2, "kvm-6.5")[0].zap_events == 10 * n + 4
    assert replay(w2, "zap-all")[0].zap_events == 9 * n + 2


@pytest.mark.parametrize(
    ("overrides", "base1", "base2"),
    [
        ({"vcpus": 2}, 8, 8),  # linux protocol: defType pushes vs CD flips at Linux's entry
        ({"vcpus": 2, "boot_protocol": "pvh"}, 8, 6),
        ({"vcpus": 2, "boot_protocol": "pvh", "msrs_first": False}, 8, 8),
        ({"vcpus": 3, "vmm": "crosvm"}, 11, 11),
    ],
)
def test_w3_zap_counts(overrides: dict[str, object], base1: int, base2: int) -> None:
    trace = build("W3", overrides)
    assert replay(trace, "kvm-6.5")[0].zap_events == base1
    assert replay(trace, "zap-all")[0].zap_events == base2


def test_w4_w5_w6_zap_counts() -> None:
    # Predictions, derived from the rules in docs/semantics.md and the module docstrings (no
    # published figure exists for these workloads): QEMU's restore puts CR0 (CD=0) before the
    # MTRRs and writes defType (E=1) first, so all 28 MSRs of each vCPU zap under both rule
    # sets; the event adds 2 per vCPU (W4), the add and the delete 2 each (W5).
    n = 6
    w4 = build("W4", {"vcpus": n, "ram": 64 << 30, "max_mapping_level": "1G"})
    assert (replay(w4, "kvm-6.5")[0].zap_events, replay(w4, "zap-all")[0].zap_events) == (
        28 * n + 2 * n,
        28 * n + 2 * n,
    )
    w5 = build("W5", {"vcpus": n, "ram": 8 << 30})
    assert (replay(w5, "kvm-6.5")[0].zap_events, replay(w5, "zap-all")[0].zap_events) == (
        28 * n + 4 * n,
        28 * n + 4 * n,
    )
    for variant in ("kvm", "cd0"):
        w6 = build("W6", {"vcpus": n, "variant": variant})
        linux = 2 + 2 * n
        assert replay(w6, "kvm-6.5")[0].zap_events == n + linux
        assert replay(w6, "zap-all")[0].zap_events == n + linux  # kvm: 1 + (n-1) CD flips


@pytest.mark.parametrize("workload", ["W4", "W5"])
def test_a_restore_puts_cr0_before_the_mtrrs_and_deftype_first(workload: str) -> None:
    # qemu target/i386/kvm/kvm.c kvm_arch_put_registers: kvm_put_sregs2 before kvm_put_msrs,
    # whose MTRR block starts with MSR_MTRRdefType.
    trace = build(workload, {"vcpus": 2, "ram": 8 << 30})
    for vcpu in range(2):
        pushed = [
            op
            for op in trace.items
            if isinstance(op, WriteCr0 | WriteMsr) and op.vcpu == vcpu and op.host
        ]
        assert isinstance(pushed[0], WriteCr0) and pushed[0].value == LINUX_CR0
        assert not pushed[0].value & cr0.CD
        assert [op.msr for op in pushed[1:] if isinstance(op, WriteMsr)] == list(msrs.MTRR_MSRS)
        assert isinstance(pushed[1], WriteMsr) and pushed[1].value & msrs.DEFTYPE_E


def test_ovmfs_mtrr_wrapper_clears_only_e() -> None:
    # edk2 MtrrLib.c MtrrLibPreMtrrChange: DefType.Bits.E = 0, FE and the type kept.
    trace = build("W2", {"vcpus": 2, "ram": 4 << 30})
    held: dict[int, int] = {}
    disabling = []
    for op in trace.items:
        ops = [o for _, lane in op.lanes for o in lane] if isinstance(op, Burst) else [op]
        if isinstance(op, WriteCr0) and op.value == LINUX_CR0:
            break  # Linux's entry: its mtrr_disable clears E, FE and the type
        for o in ops:
            if isinstance(o, WriteMsr) and o.msr == msrs.DEFTYPE:
                before = held.get(o.vcpu, 0)
                if before & msrs.DEFTYPE_E and not o.value & msrs.DEFTYPE_E:
                    disabling.append(o.value)
                    assert o.value == before & ~msrs.DEFTYPE_E
                held[o.vcpu] = o.value
    assert disabling and all(value == 0x406 for value in disabling)  # 0xC06 with E cleared


def test_w6_is_xen_by_default_with_both_pci_holes() -> None:
    # Xen: xg_dom_x86.c starts the BSP with CR0 = PE|ET, hvm_vcpu_reset_state gives an AP ET:
    # every vCPU programs its MTRRs with CD=0. cacheattr.c covers [pci_mem_start, pci_mem_end =
    # RESERVED_MEMBASE) and then [pci_hi_mem_start, pci_hi_mem_end).
    trace = build("W6")
    assert trace.params["variant"] == "cd0"
    cr0s = {op.vcpu: op.value for op in trace.items if isinstance(op, WriteCr0) and op.host}
    assert cr0s == {0: cr0.PE | cr0.ET, 1: cr0.ET, 2: cr0.ET, 3: cr0.ET}

    def bases(trace: Trace) -> list[int]:
        var_bases = msrs.VAR_MSRS[::2]
        ops = trace.items
        return [
            o.value for o in ops if isinstance(o, WriteMsr) and o.msr in var_bases and not o.vcpu
        ]

    low = [0xD0000000, 0xE0000000, 0xF0000000, 0xF8000000]
    # 8 GiB of q35 RAM ends at 10 GiB: one 16 GiB BAR goes at 16 GiB, the hole ends at 32 GiB.
    assert bases(trace) == [*low, 16 << 30]
    assert bases(build("W6", {"high_bars": 0})) == low


def test_w3_touches_with_cd1_depend_on_the_kernel_format() -> None:
    def before_entry(trace: Trace) -> list[object]:
        ops: list[object] = []
        for op in trace.items:
            if isinstance(op, WriteCr0) and not op.host:
                break
            if isinstance(op, Access | FaultRange):
                ops.append(op)
        return ops

    # A vmlinux (Firecracker's only x86_64 format): the VMM's page tables and the entry page.
    elf = before_entry(build("W3"))
    assert elf == [Access(0, gpa) for gpa in (0x9000, 0xA000, 0xB000, 16 << 20)]
    # A bzImage (crosvm): the decompressor runs with CD=1 over its 32 MiB from 1 MiB.
    bz = before_entry(build("W3", {"vmm": "crosvm", "kernel_format": "bzimage"}))
    assert bz == [FaultRange(0, 1 << 20, 33 << 20)]
    with pytest.raises(InvalidArgument, match="firecracker loads no bzImage"):
        build("W3", {"kernel_format": "bzimage"})


@pytest.mark.parametrize("workload", ["W1", "W2"])
def test_counted_work_orders_the_rows_as_the_published_cycles(workload: str) -> None:
    trace = build(workload)
    rows = [replay(trace, strategy)[0] for strategy in SERIES]
    for metric in ("leaves_removed", "entries_visited", "refaults"):
        values = [getattr(c, metric) for c in rows]
        assert values == sorted(values, reverse=True), (metric, values)
    assert rows[0].entries_visited > rows[3].entries_visited


@pytest.mark.parametrize(("workload", "bursts"), [("W1", 1), ("W2", 5)])
def test_serialised_zapping_deduplicates_in_the_bursts(workload: str, bursts: int) -> None:
    trace = build(workload)
    assert sum(isinstance(item, Burst) for item in trace.items) == bursts
    zap_all, serialised = replay(trace, "zap-all")[0], replay(trace, "zap-all-serialized")[0]
    assert serialised.duplicates_dropped > 0
    assert serialised.zaps_executed < zap_all.zaps_executed
    assert zap_all.duplicates_dropped == 0


def test_w1s_ap_cd_clear_burst_is_where_its_duplicates_come_from() -> None:
    trace = build("W1")
    (burst,) = [item for item in trace.items if isinstance(item, Burst)]
    clearing = [vcpu for vcpu, ops in burst.lanes if any(isinstance(op, WriteCr0) for op in ops)]
    # Every AP clears CD in it; the BSP, spinning for SMPLock, only touches memory.
    assert sorted(clearing) == list(range(1, 8))
    assert {vcpu for vcpu, _ in burst.lanes} == set(range(8))
    assert replay(trace, "zap-all-serialized")[0].duplicates_dropped == len(clearing) - 1


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_every_workload_ends_quiescent_and_clean_under_the_series(workload: str) -> None:
    small = {"vcpus": 4, "ram": 8 << 30} if workload != "W4" else {"vcpus": 4, "ram": 64 << 30}
    trace = build(workload, small)
    for strategy in SERIES:
        counters, vm = replay(trace, strategy)
        report = vm.stale_at_quiescence()
        assert report is not None and report.clean, (strategy, report)
        assert vm.staleness.stale_points == 0
        assert counters.faults > 0


def test_the_same_seed_gives_the_same_trace_and_counts() -> None:
    first, second = build("W2", seed=7), build("W2", seed=7)
    assert first.items == second.items
    other = build("W2", seed=8)
    assert [b.seed for b in first.items if isinstance(b, Burst)] != [
        b.seed for b in other.items if isinstance(b, Burst)
    ]
    assert replay(first, "fine-grained")[0] == replay(second, "fine-grained")[0]


# -- the default job over gRPC ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving() as running:
        (address,) = running.addresses
        yield address


@pytest.mark.parametrize("workload", ["W1", "W2"])
@pytest.mark.parametrize("strategy", ["kvm-6.5", *SERIES])
def test_the_default_job_counts_the_same_in_process_and_over_grpc(
    server: str, workload: str, strategy: str
) -> None:
    local = run(RunSpec(workload, strategy))
    remote = run(RunSpec(workload, strategy, target=server))
    assert remote["mode"] == "grpc" and local["mode"] == "in-process"
    assert remote["counters"] == local["counters"]
    assert remote["staleness"] == local["staleness"]
    assert local["published"]["zap_count"] == local["counters"]["zap_events"]
