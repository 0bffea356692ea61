"""The deterministic burst model (docs/semantics.md#bursts): lock-step rounds, seeded order,
real de-dup."""

from __future__ import annotations

import pytest

from mtrremu.core import msrs
from mtrremu.core.burst import execute, run_burst
from mtrremu.core.errors import InvalidArgument, NotFound
from mtrremu.core.events import (
    Access,
    AttachDma,
    Burst,
    BurstResult,
    EventResult,
    Refused,
    VcpuOp,
    WriteCr0,
    WriteMsr,
)
from mtrremu.core.vm import Vm
from mtrremu.core.zap_list import Role
from tests.helpers import CD0, GIB, gpa, make_vm, programmed

VCPUS = 8


def burst(lanes: dict[int, list[VcpuOp]], seed: int = 1) -> Burst:
    return Burst(tuple((vcpu, tuple(ops)) for vcpu, ops in lanes.items()), seed)


def results(done: BurstResult, vcpu: int) -> list[EventResult]:
    listed = done.lanes[vcpu]
    assert all(isinstance(r, EventResult) for r in listed)
    return [r for r in listed if isinstance(r, EventResult)]


def cd_clear_burst(vm: Vm, seed: int = 1) -> BurstResult:
    return run_burst(vm, burst({v: [WriteCr0(v, CD0)] for v in range(VCPUS)}, seed))


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
    vm = programmed(strategy, VCPUS)
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
        done = cd_clear_burst(programmed("zap-all-serialized", VCPUS), seed)
        roles = {v: results(done, v)[0].zap for v in range(VCPUS)}
        assert sorted(z.role.value for z in roles.values() if z and z.role) == ["drained"] + [
            "waited"
        ] * (VCPUS - 1)
        drainers.add(next(v for v, z in roles.items() if z and z.role is Role.DRAINED))
    assert len(drainers) > 1  # the seed decides who drains


def test_the_same_seed_gives_the_same_counts_and_store() -> None:
    def run(seed: int) -> tuple[dict[str, int], list[tuple[int, int]]]:
        vm = programmed("fine-grained", VCPUS)
        lanes: dict[int, list[VcpuOp]] = {
            v: [
                WriteCr0(v, CD0),
                Access(v, 3 * GIB + gpa(v)),
                WriteMsr(v, msrs.DEFTYPE, 0xC00),
            ]
            for v in range(VCPUS)
        }
        run_burst(vm, burst(lanes, seed))
        counts = vm.counters.as_dict()
        return counts, [(int(level), len(g)) for level, g, _ in vm.store.leaves()]

    assert run(7) == run(7)


def test_lanes_of_different_lengths_run_round_by_round() -> None:
    vm = make_vm("zap-all-serialized", vcpus=3)
    done = run_burst(
        vm,
        burst(
            {
                0: [WriteCr0(0, CD0), Access(0, 0x1000), Access(0, 0x2000)],
                1: [WriteCr0(1, CD0)],
                2: [],
            }
        ),
    )
    assert [len(done.lanes[v]) for v in range(3)] == [3, 1, 0]
    assert vm.counters.drains == 1 and vm.counters.waits == 1


@pytest.mark.parametrize(
    "lanes",
    [
        ((0, (WriteCr0(1, CD0),)),),  # an operation of another vCPU
        ((0, (AttachDma(),)),),  # not a per-vCPU operation
        ((0, (WriteCr0(0, CD0),)), (0, ())),  # two lanes for one vCPU
        ((5, (WriteCr0(5, CD0),)),),  # no such vCPU
        ((0, ()), (1, ())),  # no operation at all: nothing would answer the entry
    ],
)
def test_a_malformed_burst_is_refused_whole(
    lanes: tuple[tuple[int, tuple[VcpuOp, ...]], ...],
) -> None:
    vm = make_vm("zap-all-serialized", vcpus=2)
    (refused,) = execute(vm, [Burst(lanes)])
    assert isinstance(refused, Refused)
    assert refused.status in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert vm.counters.as_dict() == make_vm("zap-all-serialized", vcpus=2).counters.as_dict()
    with pytest.raises((InvalidArgument, NotFound)):
        run_burst(vm, Burst(lanes))


def test_a_refused_operation_mid_round_is_reported_and_the_round_goes_on() -> None:
    for seed in range(8):
        vm = make_vm("zap-all-serialized", vcpus=2)
        vm.fault_range(0, 0, GIB)
        done = run_burst(
            vm,
            burst(
                {
                    0: [WriteCr0(0, CD0), Access(0, 0x5000)],
                    1: [WriteMsr(1, msrs.DEFTYPE, 0x300, host=True), Access(1, 0x6000)],  # refused
                },
                seed,
            ),
        )
        refused = done.lanes[1][0]
        assert isinstance(refused, Refused) and refused.reason == "HOST_WRITE_REJECTED"
        assert "MTRRdefType" in refused.message
        assert all(isinstance(r, EventResult) for r in (*done.lanes[0], done.lanes[1][1]))
        assert vm.zap_list.queued() == [] and vm.zap_list.try_claim()
        assert vm.counters.zaps_executed == 1


def test_execute_reports_refusals_in_order_and_goes_on() -> None:
    vm = make_vm("zap-all", vcpus=1)
    done = execute(
        vm,
        [
            WriteMsr(0, msrs.DEFTYPE, 0xC06, host=True),
            WriteMsr(0, msrs.DEFTYPE, 1 << 20, host=True),  # refused
            WriteMsr(0, msrs.DEFTYPE, 0x300),  # a guest #GP: a result, not a refusal
            Access(0, 0x7000),
            Access(3, 0x7000),  # no such vCPU
        ],
    )
    kinds = [type(r).__name__ for r in done]
    assert kinds == ["EventResult", "Refused", "EventResult", "EventResult", "Refused"]
    gp = done[2]
    assert isinstance(gp, EventResult) and gp.gp is not None
    missing = done[4]
    assert isinstance(missing, Refused) and missing.status == "NOT_FOUND"
