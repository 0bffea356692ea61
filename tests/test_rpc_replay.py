"""A replay through the gRPC batch stream gives exactly the counts of the same replay in-process."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.burst import execute
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.events import (
    Access,
    AttachDma,
    Burst,
    BurstResult,
    DetachDma,
    EventResult,
    FaultRange,
    Init,
    Item,
    ItemResult,
    ReadMsr,
    Refused,
    Reset,
    VcpuOp,
    WriteCr0,
    WriteMsr,
)
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import ALL_STRATEGIES, CD0, CD1, GIB, KIB, MIB, create_vm, serving, var_mask

CONFIG = VmConfig(
    vcpus=4,
    noncoherent_dma=1,
    memslots=(
        Memslot.from_bytes(0, 640 * KIB),
        Memslot.from_bytes(MIB, 2 * GIB - MIB),
        Memslot.from_bytes(4 * GIB, 2 * GIB),
    ),
)
MSRS = [msrs.DEFTYPE, 0x250, 0x259, 0x26F, 0x200, 0x201, 0x202, 0x203, msrs.PAT, 0x210]


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with serving() as server:
        (address,) = server.addresses
        yield address


def vcpu_op(rng: random.Random, vcpu: int) -> VcpuOp:
    roll = rng.random()
    if roll < 0.45:
        msr = rng.choice(MSRS)
        value = rng.choice(
            [0, 0xC06, 0x806, 0xC00, 0x0606060606060606, 0xC0000000, var_mask(GIB), 2, 1 << 40]
        )
        return WriteMsr(vcpu, msr, value, host=rng.random() < 0.3)
    if roll < 0.65:
        return WriteCr0(vcpu, rng.choice([CD0, CD1, CD0 | (1 << 29)]), host=rng.random() < 0.1)
    if roll < 0.85:
        return Access(vcpu, rng.randrange(0, 6 * GIB >> 12))
    if roll < 0.9:
        start = rng.randrange(0, 6 * GIB >> 12)
        return FaultRange(vcpu, start, start + rng.choice([1, 512, 4096, 262144]))
    if roll < 0.95:
        return ReadMsr(vcpu, rng.choice(MSRS))
    lifecycle: list[VcpuOp] = [Reset(vcpu), Init(vcpu)]
    return rng.choice(lifecycle)


def trace(seed: int) -> list[Item]:
    rng = random.Random(seed)
    items: list[Item] = []
    for _ in range(300):
        roll = rng.random()
        if roll < 0.1:
            lanes = tuple(
                (vcpu, tuple(vcpu_op(rng, vcpu) for _ in range(rng.randrange(0, 4))))
                for vcpu in rng.sample(range(CONFIG.vcpus), rng.randrange(1, CONFIG.vcpus + 1))
            )
            items.append(Burst(lanes, rng.randrange(1 << 32)))
        elif roll < 0.12:
            dma: list[Item] = [AttachDma(), DetachDma()]
            items.append(rng.choice(dma))
        else:
            items.append(vcpu_op(rng, rng.randrange(CONFIG.vcpus + 1)))  # +1: an unknown vCPU
    return items


def shape(result: ItemResult) -> tuple[object, ...]:
    """What each item did, comparable across the two paths."""
    if isinstance(result, Refused):
        return ("refused", result.status, result.reason)
    if isinstance(result, BurstResult):
        # Over gRPC a lane is known by its results: a lane without operations has none.
        return ("burst", {v: [shape(r) for r in rs] for v, rs in result.lanes.items() if rs})
    assert isinstance(result, EventResult)
    return ("ok", result.gp is not None, result.counters.as_dict())


def remote_shapes(results: list[pb.OperationResult]) -> list[tuple[object, ...]]:
    """The shapes of the items a flat list of results answers, grouping a burst's results by
    their entry and lane."""
    shapes: list[tuple[object, ...]] = []
    for _, group in itertools.groupby(results, key=lambda r: r.entry):
        first, *rest = group
        if not first.HasField("lane"):
            assert not rest
            shapes.append(remote_shape(first))
            continue
        lanes: dict[int, list[tuple[object, ...]]] = {}
        for result in (first, *rest):
            lane = lanes.setdefault(result.lane.vcpu, [])
            assert result.lane.index == len(lane)
            lane.append(remote_shape(result))
        shapes.append(("burst", lanes))
    return shapes


def remote_shape(result: pb.OperationResult) -> tuple[object, ...]:
    if result.HasField("error"):
        return ("refused", result.error.status, result.error.reason)
    counters = {name: getattr(result.outcome.counters, name) for name in COUNTER_NAMES}
    counters["leaves_removed"] = sum(counters[f"leaves_removed_{s}"] for s in ("4k", "2m", "1g"))
    counters["entries_visited"] = sum(
        counters[f"entries_visited_{s}"] for s in ("root", "1g", "2m", "4k")
    )
    counters["recalc_work"] = 512 * counters["recalc_pushdowns"] + counters["recalc_leaves"]
    return ("ok", result.outcome.HasField("guest_fault"), counters)


COUNTER_NAMES = tuple(pb.Counters.DESCRIPTOR.fields_by_name)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("seed", [1, 2])
def test_a_trace_replayed_over_grpc_counts_exactly_as_in_process(
    target: str, strategy: str, seed: int
) -> None:
    items = trace(seed)
    local = create_vm(CONFIG, strategy)
    local_results = execute(local, items)
    with Client(target) as client:
        remote = client.create_vm(CONFIG, strategy)
        remote_results = remote.execute(items, batch_size=37)
        assert remote.counters() == local.counters
        runs = [(r.start_gpa >> 12, r.leaves) for r in remote.dump_leaves()]
        assert runs == [(start, count) for _, start, count, _ in local.leaf_runs()]
        stale = remote.staleness(0)
        assert stale.stale_leaves == local.stale(0).count
        remote.delete()
    assert remote_shapes(remote_results) == [shape(r) for r in local_results]
    kinds = {s[0] for s in (shape(r) for r in local_results)}
    assert kinds == {"ok", "refused", "burst"}  # the trace exercised every kind of result
