"""The oracle after each event: what an event left newly stale for its own vCPU, once its zaps
ran, less what the strategy's declared gaps explain (see ``mtrremu.core.oracle``).

Each case is built so the expected leaf count follows from the scenario: one UC leaf faulted
in a UC range, then one event that changes its type for the acting vCPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from mtrremu_strategies.series import FineGrained

from mtrremu.core import msrs
from mtrremu.core.burst import run_burst
from mtrremu.core.config import VmConfig
from mtrremu.core.events import Burst, WriteCr0
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtypes import MemType
from mtrremu.core.oracle import Gap
from mtrremu.core.vm import Vm
from mtrremu.plugin import Profile, StrategySpec, hookimpl
from mtrremu.plugin.manager import PluginManager
from tests.helpers import CD0, CD1, GIB, MIB, gfn, gpa, set_deftype, set_var


class _Ungapped:
    """fine-grained's behaviour without its declared gap."""

    @hookimpl
    def mtrremu_strategies(self) -> list[StrategySpec]:
        return [
            StrategySpec(
                "fine-ungapped",
                "fine-grained, gaps undeclared",
                Profile.KVM_6_7,
                lambda options: FineGrained(),
            )
        ]


MANAGER = PluginManager(
    entry_points=False, modules=("mtrremu.testing.mutants",), plugins=[_Ungapped()]
)
PAGE = gfn(3 * GIB)


def uc_leaf(strategy: str, vcpus: int = 1) -> Vm:
    """Every vCPU: UC over [3 GiB, 4 GiB), WB default, CD=0 (host writes); one UC leaf."""
    vm = MANAGER.create_vm(VmConfig(vcpus=vcpus, noncoherent_dma=1, track_staleness=True), strategy)
    for vcpu in range(vcpus):
        set_var(vm, vcpu, 0, 3 * GIB, GIB, MemType.UC)
        set_deftype(vm, vcpu, 0xC06)
        vm.write_cr0(vcpu, CD0, host=True)
    vm.access(0, gpa(PAGE))
    return vm


def test_a_missing_zap_is_stale_for_the_acting_vcpu_at_once() -> None:
    vm = uc_leaf("mutant-zaps-nothing")
    vm.write_cr0(0, CD1)  # CD=1: the UC leaf should now be WB
    log = vm.staleness
    assert (log.event_checks, log.stale_events, log.stale_event_leaves_max) == (1, 1, 1)
    assert log.first_stale_event.startswith("guest CR0 write of 0x40000011 on vCPU 0 left 1")
    assert "UC, fresh fault: WB" in log.first_stale_event


@pytest.mark.parametrize("strategy", ["fine-grained", "zap-all", "kvm-6.11"])
def test_a_strategy_that_zaps_leaves_no_stale_event(strategy: str) -> None:
    vm = uc_leaf(strategy)
    vm.write_cr0(0, CD1)
    vm.write_cr0(0, CD0)
    assert vm.staleness.stale_events == 0
    assert vm.staleness.event_checks == (0 if strategy == "kvm-6.11" else 2)


def test_released_kvm_s_cd_gap_is_excused_by_name() -> None:
    vm = uc_leaf("kvm-6.7")
    vm.write_cr0(0, CD1)
    assert vm.staleness.stale_events == 0
    assert vm.staleness.excused == {Gap.CD_TOGGLE.value: 1}
    assert vm.stale(0).count == 1  # excused, not hidden: the leaf is still stale


def test_a_moved_range_is_excused_only_in_its_old_span() -> None:
    for strategy, excused in (("fine-grained", True), ("fine-ungapped", False)):
        vm = uc_leaf(strategy)
        # Move the UC pair to [1 GiB, 2 GiB) with E=1 and CD=0: zapped at its new span only.
        assert vm.write_msr(0, msrs.PHYSBASE0, GIB | MemType.UC).gp is None
        log = vm.staleness
        assert log.stale_events == (0 if excused else 1), strategy
        assert log.excused == ({Gap.MOVED_RANGE.value: 1} if excused else {}), strategy


def test_a_dma_transition_is_checked_for_every_view() -> None:
    vm = uc_leaf("mutant-forgets-dma", vcpus=2)
    vm.write_cr0(1, CD1)  # two views now: vCPU 0 at CD=0, vCPU 1 at CD=1 (its zap took PAGE)
    vm.access(0, gpa(PAGE))  # UC: right for vCPU 0, already stale for vCPU 1 (WB at CD=1)
    vm.access(0, GIB)  # WB: right for both
    before = vm.staleness.event_checks
    vm.detach_dma()  # every page becomes WB+IPAT for both; nothing is zapped
    log = vm.staleness
    assert log.event_checks == before + 2
    assert log.stale_events == 2  # newly stale: both leaves for vCPU 0, the WB one for vCPU 1
    assert log.stale_event_leaves_max == 2


def test_an_event_that_changes_nothing_for_its_vcpu_is_not_checked() -> None:
    vm = uc_leaf("mutant-zaps-nothing")
    vm.write_cr0(0, CD1)
    checks = vm.staleness.event_checks
    # With CD=1 the vCPU's types do not depend on its MTRRs.
    vm.write_msr(0, msrs.DEFTYPE, 0x806)
    assert vm.staleness.event_checks == checks


def test_in_a_burst_the_check_waits_for_the_round_s_drain() -> None:
    vm = uc_leaf("zap-all-serialized", vcpus=2)
    lanes = ((0, (WriteCr0(0, CD1),)), (1, (WriteCr0(1, CD1),)))
    run_burst(vm, Burst(lanes, seed=3))
    # Both queued ZAP_ALL; one drained it after the round: nothing was stale for either.
    assert vm.counters_snapshot().duplicates_dropped == 1
    assert (vm.staleness.event_checks, vm.staleness.stale_events) == (2, 0)


def test_differences_are_where_two_maps_disagree() -> None:
    one = IntervalMap(np.array([0, 10, 20], dtype=np.int64), np.array([1, 2, 3], dtype=np.uint8))
    two = IntervalMap(np.array([0, 15], dtype=np.int64), np.array([1, 3], dtype=np.uint8))
    starts, ends = one.differences(two)
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [(10, 15), (15, 20)]
    assert not one.same_as(two) and one.same_as(one)


def test_mismatches_within_ranges_see_every_leaf_overlapping_them() -> None:
    vm = uc_leaf("fine-grained")
    vm.fault_range(0, 0, 64 * MIB)
    expected = vm.plan(vm.vcpus[0]).values
    vm.write_cr0(0, CD1)  # the plan changes; the leaves do not (fine-grained zapped the UC one)
    vm.access(0, gpa(PAGE))  # a WB leaf now, stale once CD clears
    vm.write_cr0(0, CD0, host=True)  # a host write: no zap, no event check
    full = {int(g) for _, gfns, *_ in vm.store.mismatches(expected) for g in gfns}
    ranges = (np.array([PAGE], dtype=np.int64), np.array([PAGE + 1], dtype=np.int64))
    within = {int(g) for _, gfns, *_ in vm.store.mismatches(expected, ranges) for g in gfns}
    assert full == within == {PAGE}
