"""The timing model: counted zap work turned into CPU cycles spent inside zap calls
(docs/timing.md).

Each event's zap work comes from its own counters (entries visited, leaves removed, TLB flushes,
zap-list operations; a mark pass for deferred re-evaluation counts as zap work too). Events
outside bursts run alone: their cycles are their work. The events of one burst round run at
the same time on as many host CPUs:

* **zap-list waiters** (patch 9) spin until the round's drainer has finished: each is charged
  the drainer's time as *waiting*; while they spin, a drainer holding the MMU lock for write
  sees contention at every entry and yields (a hand-off per entry visited, *yields*);
* **direct zaps holding the MMU lock for write** contend for it: the holder yields whenever
  another writer waits, so they share the lock round-robin (processor sharing), and every
  entry a writer visits while others wait costs a hand-off (drop the lock, let the other in,
  retake it, restart the walk) counted as *yields*; a writer is charged from the round's start
  to its finish, so what it spends waiting for the others is *waiting*;
* **zaps holding the lock for read** (patch 12) run side by side: no waiting.

Six costs (:class:`CycleCosts`), the same for every strategy, firmware and vCPU count, turn the
counts into cycles; the defaults are fitted on the series' published 8-vCPU cycles
(``scripts/fit_cycles.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass, fields

from mtrremu.core.counters import Counters
from mtrremu.core.events import BurstResult, EventResult, ItemResult
from mtrremu.core.strategy import MmuLock


@dataclass(frozen=True)
class CycleCosts:
    """The model's parameters, in cycles."""

    #: Per entry a zap walk visits.
    entry: float
    #: Per leaf removed.
    leaf: float
    #: Per TLB flush.
    flush: float
    #: Per entry a zap-list drainer visits while holding the MMU lock for write and other vCPUs
    #: wait for its drain (they keep checking the lock: the drainer sees contention, yields).
    spin: float
    #: Per zap-list operation (a range queued or dropped as a duplicate, a drain, a wait).
    list_op: float
    #: Per entry visited while another writer waits for the MMU lock (a yield and a restart).
    handoff: float

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_tuple(self) -> tuple[float, ...]:
        return astuple(self)


#: Fitted by ``scripts/fit_cycles.py`` on the 16 published rows (docs/timing.md#calibration).
DEFAULT_COSTS = CycleCosts(
    entry=393.0, leaf=8920.0, flush=5050.0, spin=421.0, list_op=50.0, handoff=2750.0
)


@dataclass(frozen=True)
class ZapCall:
    """One event's zap work, read from its own counters."""

    entries: int
    leaves: int
    flushes: int
    list_ops: int
    #: The event waited for another vCPU's zap-list drain.
    waited: bool

    @classmethod
    def of(cls, counters: Counters) -> ZapCall | None:
        """The zap work of an event whose own counts are ``counters``, or None if it did none."""
        c = counters
        list_ops = c.ranges_queued + c.duplicates_dropped + c.drains + c.waits
        if not (c.zaps_executed or list_ops or c.recalc_marks):
            return None  # no zap, no zap-list traffic, no re-evaluation marks: not timed
        return cls(c.entries_visited, c.leaves_removed, c.tlb_flushes, list_ops, c.waits > 0)

    def work(self, costs: CycleCosts) -> float:
        return (
            self.entries * costs.entry
            + self.leaves * costs.leaf
            + self.flushes * costs.flush
            + self.list_ops * costs.list_op
        )


@dataclass
class Cycles:
    """Cycles spent inside zap calls, by part."""

    work: float = 0.0
    waiting: float = 0.0
    yields: float = 0.0

    @property
    def total(self) -> float:
        return self.work + self.waiting + self.yields

    def add(self, other: Cycles) -> None:
        self.work += other.work
        self.waiting += other.waiting
        self.yields += other.yields

    def millions(self) -> dict[str, float]:
        """Total and parts in millions of cycles, rounded to 0.01."""
        return {
            "total": round(self.total / 1e6, 2),
            "work": round(self.work / 1e6, 2),
            "waiting": round(self.waiting / 1e6, 2),
            "yields": round(self.yields / 1e6, 2),
        }


def round_cycles(calls: Sequence[ZapCall], costs: CycleCosts, lock: MmuLock) -> Cycles:
    """The cycles of zap calls made at the same time (one burst round, or one event alone)."""
    result = Cycles()
    work = [call.work(costs) for call in calls]
    result.work = sum(work)
    waiters = [w for call, w in zip(calls, work, strict=True) if call.waited]
    others = [(call, w) for call, w in zip(calls, work, strict=True) if not call.waited]
    if waiters:
        drainer, drain = max(others, key=lambda pair: pair[1], default=(None, 0.0))
        if drainer is not None and lock is MmuLock.WRITE:
            # The waiters keep checking the lock the drainer holds for write, so it sees
            # contention at every entry and yields (patch 11's gain is fewer of these).
            result.yields = drainer.entries * costs.spin
            drain += result.yields
        result.waiting = drain * len(waiters)
        return result
    if lock is MmuLock.READ or len(others) < 2:
        return result
    finish, yields = _share_the_lock(
        [w for _, w in others], [c.entries * costs.handoff for c, _ in others]
    )
    result.yields = yields
    result.waiting = sum(finish) - result.work - yields
    return result


def _share_the_lock(work: list[float], handoffs: list[float]) -> tuple[list[float], float]:
    """Writers sharing the MMU lock round-robin from time 0: each one's finish time, and the
    hand-off cycles spent while two or more contended. A writer's demand while contended is
    its work plus its hand-offs; alone, its work."""
    demand = [w + h for w, h in zip(work, handoffs, strict=True)]
    left = [1.0] * len(work)
    finish = [0.0] * len(work)
    active = [i for i in range(len(work)) if demand[i] > 0]
    now = yields = 0.0
    while len(active) >= 2:
        count = len(active)
        first = min(active, key=lambda i: left[i] * demand[i])
        step = left[first] * demand[first] * count
        for i in active:
            done = step / (count * demand[i])
            left[i] -= done
            yields += done * handoffs[i]
        now += step
        finish[first] = now
        left[first] = 0.0
        active.remove(first)
    for i in active:
        finish[i] = now + left[i] * work[i]
    return finish, yields


def model_cycles(rounds: Iterable[Sequence[ZapCall]], costs: CycleCosts, lock: MmuLock) -> Cycles:
    """The cycles of a whole replay: its rounds in order (sequential events are rounds of
    one)."""
    total = Cycles()
    for calls in rounds:
        if calls:
            total.add(round_cycles(calls, costs, lock))
    return total


def rounds_of(results: Iterable[ItemResult]) -> Iterator[tuple[ZapCall, ...]]:
    """The zap calls of a replay (:func:`~mtrremu.core.burst.replay`'s results), grouped into
    what ran at the same time: a burst's rounds, every other event alone (rounds without a zap
    call left out). Lazy, as the results are: a replay of any length is folded in passing."""
    for item in results:
        if isinstance(item, BurstResult):
            lanes = list(item.lanes.values())
            for index in range(max((len(lane) for lane in lanes), default=0)):
                events = [lane[index] for lane in lanes if index < len(lane)]
                calls = _calls(e for e in events if isinstance(e, EventResult))
                if calls:
                    yield calls
        elif isinstance(item, EventResult):
            calls = _calls([item])
            if calls:
                yield calls


def _calls(events: Iterable[EventResult]) -> tuple[ZapCall, ...]:
    found = (ZapCall.of(e.counters) for e in events if e.counted)
    return tuple(call for call in found if call is not None)
