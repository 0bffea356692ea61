"""The deterministic burst model (semantics.md §7): lock-step rounds, seeded order, real de-dup."""

from __future__ import annotations

import pytest

from mtrremu.core import msrs
from mtrremu.core.burst import run_burst
from mtrremu.core.errors import InvalidArgument, RejectedHostWrite
from mtrremu.core.events import Access, AttachDma, EventResult, Op, WriteCr0, WriteMsr
from mtrremu.core.memtypes import MemType
from mtrremu.core.vm import Vm
from mtrremu.core.zap_list import Role
from tests.helpers import CD0, GIB, MIB, gfn, make_vm, set_deftype, set_fixed_all, set_var

VCPUS = 8


def programmed(strategy: str) -> Vm:
    vm = make_vm(strategy, vcpus=VCPUS)
    for vcpu in range(VCPUS):
        set_fixed_all(vm, vcpu, MemType.WB)
        set_var(vm, vcpu, 0, 3 * GIB, GIB, MemType.UC)
        set_var(vm, vcpu, 1, 2 * GIB, 256 * MIB, MemType.WT)
        set_deftype(vm, vcpu, 0xC06)
    vm.fault_range(0, 0, gfn(4 * GIB))
    return vm


def cd_clear_burst(vm: Vm, seed: int = 1) -> dict[int, list[EventResult]]:
    lanes: dict[int, list[Op]] = {v: [WriteCr0(v, CD0)] for v in range(VCPUS)}
    return run_burst(vm, lanes, seed)


@pytest.mark.parametrize(
    ("strategy", "queued", "dropped", "zaps"),
    [
        ("zap-all", 0, 0, VCPUS),
        ("zap-all-serialized", 1, VCPUS - 1, 1),
        ("fine-grained", 2, 2 * (VCPUS - 1), 2),
        ("fine-grained-split", 2, 2 * (VCPUS - 1), 2),
    ],
)
def test_a_cd_clear_burst_deduplicates_through_the_list(
    strategy: str, queued: int, dropped: int, zaps: int
) -> None:
    vm = programmed(strategy)
    before = vm.counters_snapshot()
    cd_clear_burst(vm)
    c = vm.counters
    assert c.zap_events - before.zap_events == VCPUS
    assert c.ranges_queued - before.ranges_queued == queued
    assert c.duplicates_dropped - before.duplicates_dropped == dropped
    assert c.zaps_executed - before.zaps_executed == zaps
    serialized = strategy != "zap-all"
    assert c.drains - before.drains == (1 if serialized else 0)
    assert c.waits - before.waits == (VCPUS - 1 if serialized else 0)


def test_the_first_requester_in_seeded_order_drains_and_others_wait() -> None:
    drainers = set()
    for seed in range(6):
        vm = programmed("zap-all-serialized")
        results = cd_clear_burst(vm, seed)
        roles = {v: r[0].zap.role for v, r in results.items() if r[0].zap and r[0].zap.role}
        assert sorted(role.value for role in roles.values()) == ["drained"] + ["waited"] * 7
        drainers.add(next(v for v, role in roles.items() if role is Role.DRAINED))
    assert len(drainers) > 1  # the seed decides who drains


def test_the_same_seed_gives_the_same_counts_and_store() -> None:
    def run(seed: int) -> tuple[dict[str, int], list[tuple[int, int]]]:
        vm = programmed("fine-grained")
        lanes: dict[int, list[Op]] = {
            v: [WriteCr0(v, CD0), Access(v, gfn(3 * GIB) + v), WriteMsr(v, msrs.DEFTYPE, 0xC00)]
            for v in range(VCPUS)
        }
        run_burst(vm, lanes, seed)
        counts = vm.counters.as_dict()
        return counts, [(int(level), len(g)) for level, g, _ in vm.store.leaves()]

    assert run(7) == run(7)


def test_lanes_of_different_lengths_run_round_by_round() -> None:
    vm = make_vm("zap-all-serialized", vcpus=3)
    lanes: dict[int, list[Op]] = {
        0: [WriteCr0(0, CD0), Access(0, 1), Access(0, 2)],
        1: [WriteCr0(1, CD0)],
        2: [],
    }
    results = run_burst(vm, lanes, seed=3)
    assert [len(results[v]) for v in range(3)] == [3, 1, 0]
    assert vm.counters.drains == 1 and vm.counters.waits == 1


def test_a_lane_may_only_hold_its_own_vcpus_operations() -> None:
    vm = make_vm("zap-all-serialized", vcpus=2)
    with pytest.raises(InvalidArgument):
        run_burst(vm, {0: [WriteCr0(1, CD0)]}, seed=0)
    with pytest.raises(InvalidArgument):
        run_burst(vm, {0: [AttachDma()]}, seed=0)


def test_a_refused_operation_mid_round_still_drains_what_was_queued() -> None:
    lanes: dict[int, list[Op]] = {
        0: [WriteCr0(0, CD0)],
        1: [WriteMsr(1, msrs.DEFTYPE, 0x300, host=True)],  # reserved bits: refused
    }
    drained_before_refusal = 0
    for seed in range(8):
        vm = make_vm("zap-all-serialized", vcpus=2)
        vm.fault_range(0, 0, gfn(GIB))
        with pytest.raises(RejectedHostWrite):
            run_burst(vm, lanes, seed)
        assert vm.zap_list.queued() == []
        assert vm.zap_list.try_claim()  # nobody holds the flag
        drained_before_refusal += vm.store.leaf_total == 0
    assert 0 < drained_before_refusal < 8  # both orders happened
