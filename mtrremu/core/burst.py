"""The deterministic burst model: vCPUs acting at the same time, made exact
(docs/semantics.md#bursts).

Inside a burst every vCPU has its own list of operations. They advance in lock-step rounds:
round *r* runs each vCPU's *r*-th operation, in an order drawn from the seed. Every zap-list
request made in a round is queued before anyone drains; then the round's first requester
drains the list and the others wait. That is where duplicates meet, so de-duplication is real
and the counts repeat exactly for the same seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from mtrremu.core.errors import InvalidArgument, MtrremuError
from mtrremu.core.events import (
    Burst,
    BurstResult,
    EventResult,
    Item,
    ItemResult,
    Refused,
    VcpuOp,
)
from mtrremu.core.operations import BY_TYPE
from mtrremu.core.vm import Vm


def refusal(item: Item, error: MtrremuError) -> Refused:
    return Refused(item, error.status, error.reason, str(error), error.metadata())


def check_burst(vm: Vm, burst: Burst) -> None:
    """Refuse a malformed burst before anything runs. A burst needs an operation: its
    results are its operations' results, and every batch entry must be answered."""
    if not any(ops for _, ops in burst.lanes):
        raise InvalidArgument("a burst needs at least one operation")
    seen = set()
    for vcpu, ops in burst.lanes:
        vm.vcpu(vcpu)
        if vcpu in seen:
            raise InvalidArgument(f"burst has two lanes for vCPU {vcpu}")
        seen.add(vcpu)
        for op in ops:
            kind = BY_TYPE.get(type(op))
            if kind is None or not kind.per_vcpu or getattr(op, "vcpu", None) != vcpu:
                raise InvalidArgument(f"burst lane of vCPU {vcpu} holds {op!r}")


def run_burst(vm: Vm, burst: Burst) -> BurstResult:
    """Run one burst. An operation the emulator refuses becomes a :class:`Refused` in its lane
    and the round goes on; the round's queued zaps are drained either way."""
    check_burst(vm, burst)
    order = random.Random(burst.seed)
    lanes = dict(burst.lanes)
    result = BurstResult(burst, {vcpu: [] for vcpu in lanes})
    rounds = max((len(ops) for ops in lanes.values()), default=0)
    vm.begin_burst()
    try:
        for index in range(rounds):
            _run_round(vm, lanes, index, order, result)
            vm.checkpoint()
    finally:
        vm.end_burst()
    return result


def _run_round(
    vm: Vm,
    lanes: dict[int, tuple[VcpuOp, ...]],
    index: int,
    order: random.Random,
    result: BurstResult,
) -> None:
    """Round ``index``: each vCPU's operation in seeded order, then one drain for all."""
    active = sorted(vcpu for vcpu, ops in lanes.items() if index < len(ops))
    order.shuffle(active)
    requesters: list[EventResult] = []
    for vcpu in active:
        op = lanes[vcpu][index]
        try:
            done = vm.apply(op, defer_drain=True)
        except MtrremuError as error:
            result.lanes[vcpu].append(refusal(op, error))
            continue
        result.lanes[vcpu].append(done)
        if done.zap is not None and done.zap.pending_drain:
            requesters.append(done)
    if requesters:
        vm.drain_round(requesters)


def execute_one(vm: Vm, item: Item) -> ItemResult:
    """Run one operation or burst; a refusal is reported, not raised."""
    try:
        return run_burst(vm, item) if isinstance(item, Burst) else vm.apply(item)
    except MtrremuError as error:
        return refusal(item, error)


def replay(vm: Vm, items: Iterable[Item]) -> Iterator[ItemResult]:
    """Run operations and bursts in order, each result as it comes; a refused one is reported
    and the rest go on.

    In-process runs use it; the gRPC batch stream runs each message with
    :func:`mtrremu.rpc.convert.execute`, which calls the same handlers without building the
    item twice, and consecutive single-MSR writes through :meth:`Vm.write_msr_run`, which is
    what :meth:`Vm.write_msr` runs too; so the same trace gives the same counts either way (a
    test compares them result by result).
    """
    for item in items:
        yield execute_one(vm, item)


def execute(vm: Vm, items: Iterable[Item]) -> list[ItemResult]:
    """:func:`replay`, every result kept."""
    return list(replay(vm, items))
