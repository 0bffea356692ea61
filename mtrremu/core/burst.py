"""The deterministic burst model (semantics.md §7): vCPUs acting at the same time, made exact.

Inside a burst every vCPU has its own list of operations. They advance in lock-step rounds:
round *r* runs each vCPU's *r*-th operation, in an order drawn from the seed. Every zap-list
request made in a round is queued before anyone drains; then the round's first requester
drains the list and the others wait. That is where duplicates meet, so de-duplication is real
and the counts repeat exactly for the same seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from mtrremu.core.errors import InvalidArgument
from mtrremu.core.events import VCPU_OPS, EventResult, Op
from mtrremu.core.vm import Vm


def run_burst(vm: Vm, lanes: Mapping[int, Sequence[Op]], seed: int) -> dict[int, list[EventResult]]:
    """Run one burst; returns each vCPU's results in its own operation order.

    Every operation in vCPU *k*'s lane must be a per-vCPU operation on vCPU *k*.
    """
    for vcpu, ops in lanes.items():
        vm.vcpu(vcpu)
        for op in ops:
            if not isinstance(op, VCPU_OPS) or op.vcpu != vcpu:
                raise InvalidArgument(f"burst lane of vCPU {vcpu} holds {op!r}")
    order = random.Random(seed)
    results: dict[int, list[EventResult]] = {vcpu: [] for vcpu in lanes}
    rounds = max((len(ops) for ops in lanes.values()), default=0)
    for index in range(rounds):
        active = sorted(vcpu for vcpu, ops in lanes.items() if index < len(ops))
        order.shuffle(active)
        requesters: list[EventResult] = []
        try:
            for vcpu in active:
                result = vm.apply(lanes[vcpu][index], defer_drain=True)
                results[vcpu].append(result)
                if result.zap is not None and result.zap.pending_drain:
                    requesters.append(result)
        finally:
            # Even when an operation is refused mid-round, what was queued gets drained.
            if requesters:
                vm.drain_round(requesters)
    return results
