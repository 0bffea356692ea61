"""The experimental strategies (precise, lazy), the EPT's re-evaluation marks and the event
filter. Expected numbers are derived here from the setups (predictions), or compared between
strategies on the same trace; none is a published figure."""

from __future__ import annotations

from typing import Any

import pytest

from mtrremu.ab.runner import RunSpec, run
from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.errors import MtrremuError
from mtrremu.core.memtypes import MemType
from mtrremu.core.strategy import changed_ranges, memtype_map, merge_ranges
from mtrremu.core.units import GfnRange, Level
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import (
    CD0,
    CD1,
    GIB,
    MIB,
    gfn,
    leaves,
    make_vm,
    programmed,
    serving,
    set_deftype,
    set_var,
    var_mask,
)


def span_end(leaf: tuple[int, int, int]) -> int:
    """The gfn after a leaf of :func:`leaves`."""
    base, level, _ = leaf
    return base + Level(level).pages


# -- the helpers strategies build on -------------------------------------------------------


def test_memtype_map_before_a_write_is_the_map_the_registers_gave_before_it() -> None:
    vm = programmed("precise", 1)
    vm.write_cr0(0, CD0)
    vc = vm.vcpus[0]
    before = memtype_map(vm.view(), vc.view)
    assert vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB | MemType.UC).gp is None  # move the UC pair
    assert memtype_map(vm.view(), vc.view, mtrr=vc.view.mtrr.before_write()).same_as(before)
    moved = changed_ranges(before, memtype_map(vm.view(), vc.view))
    # UC moved from [3, 4) GiB to [2, 3) GiB (over the WT range: UC wins): both spans differ.
    assert moved == (GfnRange(gfn(2 * GIB), gfn(4 * GIB)),)


def test_merge_ranges_merges_overlapping_and_abutting_spans_only() -> None:
    assert merge_ranges([(10, 20), (0, 5), (5, 8), (15, 30), (40, 50)]) == (
        GfnRange(0, 8),
        GfnRange(10, 30),
        GfnRange(40, 50),
    )


# -- precise -------------------------------------------------------------------------------


def test_precise_zaps_a_moved_range_at_its_old_and_new_span_and_nothing_else() -> None:
    vm = programmed("precise", 1)
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, 4 * GIB)
    moved = GfnRange(gfn(2 * GIB), gfn(4 * GIB))
    inside = [leaf for leaf in leaves(vm) if leaf[0] < moved.end and span_end(leaf) > moved.start]
    result = vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB | MemType.UC)  # E=1, CD=0
    assert result.zap is not None
    assert result.zap.requested == [moved]
    assert result.counters.leaves_removed == len(inside) > 0
    assert not set(inside) & set(leaves(vm))
    assert vm.stale(0).clean
    assert vm.staleness.stale_events == 0


def test_precise_covers_host_cr0_writes_and_reset() -> None:
    vm = make_vm("precise", track_staleness=True)
    set_deftype(vm, 0, 0xC00)  # UC default: a CD flip changes every RAM type
    vm.write_cr0(0, CD0, host=True)
    vm.fault_range(0, 0, 4 * GIB)
    assert vm.write_cr0(0, CD1, host=True).counters.leaves_removed > 0
    vm.fault_range(0, 0, 4 * GIB)
    vm.write_cr0(0, CD0, host=True)
    vm.fault_range(0, 0, 4 * GIB)
    assert vm.reset(0).counters.leaves_removed > 0
    assert vm.stale(0).clean
    assert vm.staleness.event_checks >= 3
    assert vm.staleness.stale_events == 0


def test_precise_zaps_nothing_for_mtrr_writes_made_with_cd_set() -> None:
    vm = programmed("precise", 1)  # CD=1 after reset; vCPU 0 faulted [0, 4 GiB)
    result = vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB | MemType.UC)
    assert result.zap is None
    assert result.counters.zap_events == 0


def test_precise_dma_transition_zaps_only_where_some_view_changes() -> None:
    vm = make_vm("precise", noncoherent_dma=0, vcpus=2)
    for vcpu in range(2):
        set_deftype(vm, vcpu, 0xC06)
        vm.write_cr0(vcpu, CD0)
    set_var(vm, 1, 0, 3 * GIB, GIB, MemType.UC)
    vm.fault_range(0, 0, 4 * GIB)  # WB+IPAT everywhere while no DMA device is attached
    result = vm.attach_dma()
    assert result.zap is not None
    # vCPU 0's view: WB without IPAT everywhere (changes all); vCPU 1's adds UC. One range.
    assert result.zap.requested == [GfnRange(0, gfn(4 * GIB))]
    assert vm.store.leaf_total == 0


def test_precise_removes_no_leaf_when_a_range_over_a_bar_without_ram_comes_and_goes() -> None:
    vm = programmed("precise", 2)
    for vcpu in range(2):
        vm.write_cr0(vcpu, CD0)
    vm.fault_range(0, 0, 2 * GIB)
    before = vm.counters_snapshot()
    for mask in (var_mask(16 * MIB), 0):  # mtrr_add then mtrr_del of WC over a BAR
        for vcpu in range(2):
            assert vm.write_msr(vcpu, msrs.PHYSBASE0 + 4, 0xE0000000 | MemType.WC).gp is None
            result = vm.write_msr(vcpu, msrs.PHYSBASE0 + 5, mask)
            assert result.counters.leaves_removed == 0
    assert vm.counters.leaves_removed == before.leaves_removed


@pytest.mark.parametrize("workload", ["W1", "W2", "W3", "W5"])
def test_precise_removes_no_more_leaves_than_fine_grained_and_leaves_nothing_stale(
    workload: str,
) -> None:
    records = {
        s: run(RunSpec(workload, s, overrides=(("vcpus", 8),))) for s in ("fine-grained", "precise")
    }
    assert records["precise"]["verdict"] == "clean", records["precise"]["staleness"]
    removed = {s: r["counters"]["leaves_removed"] for s, r in records.items()}
    assert removed["precise"] <= removed["fine-grained"], removed
    if workload == "W5":  # variant a: the BAR has no RAM behind it, so nothing changes type
        assert removed["precise"] == 0


# -- re-evaluation marks -------------------------------------------------------------------


def marked_vm(scope: str = "all") -> Vm:
    """vCPU 0 with CD=0, WB default and UC over [3, 4) GiB, [0, 4 GiB) faulted, under lazy."""
    manager = PluginManager(entry_points=False)
    vm = manager.create_vm(make_vm("lazy").config, "lazy", {"scope": scope})
    set_var(vm, 0, 0, 3 * GIB, GIB, MemType.UC)
    set_deftype(vm, 0, 0xC06)
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, 4 * GIB)
    return vm


def test_an_event_marks_only_root_entries_and_removes_nothing() -> None:
    vm = marked_vm()
    leaves = vm.store.leaf_total
    result = vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB | MemType.UC)  # UC moves to [2, 3) GiB
    counters = result.counters
    assert (counters.recalc_marks, counters.entries_visited, counters.leaves_removed) == (1, 512, 0)
    assert counters.tlb_flushes == 1
    assert vm.store.leaf_total == leaves
    assert vm.lookup(2 * GIB).recalc_pending
    assert vm.stale(0).clean  # marked leaves cannot be used: the oracle does not count them
    assert vm.staleness.stale_events == 0


def test_an_access_through_a_mark_pushes_it_down_and_re_evaluates_on_its_path() -> None:
    vm = marked_vm()
    vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB | MemType.UC)
    result = vm.access(0, 2 * GIB)
    counters = result.counters
    # The root entry's mark goes to the level-3 table's 4 present entries ([0, 4) GiB); the
    # 1 GiB leaf on the path, [2, 3) GiB, is re-evaluated: it becomes UC, and the access hits.
    assert counters.recalc_pushdowns == 1
    assert (counters.recalc_leaves, counters.recalc_changed, counters.recalc_splits) == (1, 1, 0)
    assert result.access is not None and result.access.mapping is not None
    assert result.access.mapping.level is Level.G1
    assert result.access.mapping.memtype.type is MemType.UC
    assert counters.hits == 1 and counters.faults == 0
    assert not vm.lookup(2 * GIB + 2 * MIB).recalc_pending
    assert vm.lookup(3 * GIB).recalc_pending  # its neighbours wait for their own access
    assert vm.lookup(0).recalc_pending


def test_a_huge_leaf_whose_span_became_mixed_is_split_into_marked_leaves() -> None:
    vm = marked_vm()
    # A 4 KiB UC range inside the 2 MiB leaf mapping [2, 4) MiB (pair 1: base, then mask).
    vm.write_msr(0, msrs.PHYSBASE0 + 2, 0x201000 | MemType.UC)
    vm.write_msr(0, msrs.PHYSBASE0 + 3, var_mask(0x1000))
    before = vm.store.leaf_counts()
    result = vm.access(0, 0x300000)  # another page of that 2 MiB leaf
    counters = result.counters
    # Root -> level-3 table -> level-2 table: two push-downs; the leaf is split into 512 marked
    # 4 KiB leaves, and the new table is re-evaluated whole: one of them becomes UC.
    assert counters.recalc_pushdowns == 2
    assert counters.recalc_splits == 1
    assert (counters.recalc_leaves, counters.recalc_changed) == (512, 1)
    after = vm.store.leaf_counts()
    assert after[Level.M2] == before[Level.M2] - 1
    assert after[Level.K4] == before[Level.K4] + 512
    mapping = vm.lookup(0x201000).mapping
    assert mapping is not None and mapping.level is Level.K4
    assert mapping.memtype.type is MemType.UC
    assert vm.stale(0).clean


def test_scope_changed_marks_nothing_when_nothing_changes() -> None:
    vm = marked_vm("changed")
    same = vm.write_msr(0, msrs.PHYSBASE0, 3 * GIB | MemType.UC)  # rewrite the same value
    assert same.counters.recalc_marks == 0 and same.zap is None


def test_an_unknown_scope_is_the_callers_error() -> None:
    with pytest.raises(Exception, match="scope='sometimes'") as info:
        PluginManager(entry_points=False).create_vm(
            make_vm("lazy").config, "lazy", {"scope": "sometimes"}
        )
    assert type(info.value).__name__ == "InvalidArgument"


def test_lazy_event_time_work_does_not_grow_with_the_guest() -> None:
    def counted(ram: str) -> dict[str, Any]:
        record = run(RunSpec("W4", "lazy", overrides=(("vcpus", 16), ("ram", ram))))
        assert record["verdict"] == "clean"
        counters: dict[str, Any] = record["counters"]
        return counters

    small, large = counted("1536G"), counted("12T")
    assert small["zap_events"] == large["zap_events"] > 0
    # Each event visits the 512 root entries and nothing else, at 1.5 TiB as at 12 TiB.
    assert small["entries_visited"] == large["entries_visited"] == 512 * small["zap_events"]
    assert small["leaves_removed"] == large["leaves_removed"] == 0
    assert large["recalc_work"] > small["recalc_work"] > 0  # what the accesses pay, deferred


# -- the event filter ------------------------------------------------------------------------


def filtered(events: str, strategy: str = "kvm-6.5") -> Vm:
    manager = PluginManager(entry_points=False)
    return manager.create_vm(make_vm(strategy).config, strategy, {"events": events})


def test_changed_keeps_writes_that_change_nothing_from_the_strategy() -> None:
    vm = filtered("changed")
    assert vm.write_msr(0, msrs.DEFTYPE, 0xC06).counters.zap_events == 1
    again = vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    assert (again.counters.zap_events, again.counters.events_filtered) == (0, 1)
    assert vm.vcpus[0].mtrr.deftype == 0xC06


def test_acrn_passes_only_e_transitions_while_cd_is_set() -> None:
    vm = filtered("acrn")  # CD=1 after reset
    assert vm.write_msr(0, msrs.PHYSBASE0, 3 * GIB).counters.events_filtered == 1
    assert vm.write_msr(0, msrs.DEFTYPE, 0x006).counters.events_filtered == 1  # E stays 0
    assert vm.write_msr(0, msrs.DEFTYPE, 0xC06).counters.zap_events == 1  # E 0 -> 1
    vm.write_cr0(0, CD0)
    assert vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB).counters.zap_events == 1  # CD=0: all pass
    assert vm.counters.events_filtered == 2


@pytest.mark.parametrize("workload", ["W1", "W2", "W3", "W5", "W6"])
def test_filtered_runs_stay_clean_and_save_zap_events(workload: str) -> None:
    plain = run(RunSpec(workload, "kvm-6.7", overrides=(("vcpus", 4),)))
    record = run(RunSpec(workload, "kvm-6.7:events=changed+acrn", overrides=(("vcpus", 4),)))
    assert record["verdict"] == plain["verdict"] == "clean"
    counters = record["counters"]
    assert counters["zap_events"] + counters["events_filtered"] >= plain["counters"]["zap_events"]
    assert counters["zap_events"] <= plain["counters"]["zap_events"]


# -- over gRPC ----------------------------------------------------------------------------------


def test_lazy_over_grpc_reports_pending_marks_and_counts_deferred_work() -> None:
    config = make_vm("lazy").config
    with serving() as server, Client(server.addresses[0]) as client:
        names = {s.name: dict(s.options) for s in client.list_strategies()}
        assert {"precise", "lazy"} <= set(names)
        assert set(names["lazy"]) == {"scope", "events"}
        with pytest.raises(MtrremuError) as refused:
            client.create_vm(config, "lazy", {"scope": "sometimes"})
        assert refused.value.status == "INVALID_ARGUMENT"
        vm = client.create_vm(config, "lazy", {"scope": "changed", "events": "changed"})
        vm.write_msr(0, msrs.DEFTYPE, 0xC06, host=True)
        vm.write_cr0(0, CD0)
        vm.fault_range(0, 0, 4 * GIB)
        outcome = vm.write_msr(0, msrs.PHYSBASE0, 2 * GIB | MemType.UC)
        assert outcome.counters.recalc_marks == 0  # the mask is not valid yet: nothing changes
        outcome = vm.write_msr(0, msrs.PHYSBASE0 + 1, var_mask(GIB))
        assert outcome.counters.recalc_marks == 1
        assert vm.lookup(2 * GIB).recalc_pending
        assert vm.write_msr(0, msrs.PHYSBASE0 + 1, var_mask(GIB)).counters.events_filtered == 1
        hit = vm.access(0, 2 * GIB)
        assert hit.access.mapping.memory_type == pb.MEMORY_TYPE_UC
        assert hit.counters.recalc_changed == 1
        assert not vm.lookup(2 * GIB).recalc_pending
        assert vm.counters().recalc_work == 512 * 1 + 1
        assert vm.staleness(at_quiescence=True).stale_leaves == 0
