"""Carries out a strategy's :class:`ZapDecision`: direct zaps, or the zap list with its fallbacks.

With ``defer_drain`` the ranges are queued but the drain-or-wait is left to the caller: that is
how the deterministic burst model queues every request of a round before anyone drains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mtrremu.core.config import Memslot
from mtrremu.core.counters import Counters
from mtrremu.core.strategy import AllocFailure, Route, ZapDecision
from mtrremu.core.units import ZAP_ALL, GfnRange
from mtrremu.core.zap_list import Role, Ticket, ZapList


@dataclass
class ZapReport:
    """What one event asked for and what happened to it."""

    zap_event: bool = False
    requested: list[GfnRange] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)
    #: DRAINED / WAITED once the list protocol ran; None for direct zaps or nothing.
    role: Role | None = None
    #: The list protocol is still owed (deferred drain in a burst round).
    pending_drain: bool = False
    #: An injected allocation failure sent this event down a fallback path.
    alloc_failed: bool = False

    def merged(self, later: ZapReport | None) -> ZapReport:
        """This report followed by ``later``'s (several writes answered as one)."""
        if later is None:
            return self
        return ZapReport(
            zap_event=self.zap_event or later.zap_event,
            requested=[*self.requested, *later.requested],
            tickets=[*self.tickets, *later.tickets],
            role=later.role if later.role is not None else self.role,
            pending_drain=self.pending_drain or later.pending_drain,
            alloc_failed=self.alloc_failed or later.alloc_failed,
        )


def split_by_memslots(rng: GfnRange, slots: tuple[Memslot, ...]) -> list[GfnRange]:
    """Patch 11: the parts of ``rng`` inside each memslot, in slot order."""
    parts = []
    for slot in slots:
        part = rng.intersect(slot.gfns)
        if part is not None:
            parts.append(part)
    return parts


class ZapEngine:
    """Runs decisions against one VM's EPT (through ``zap``) and zap list."""

    def __init__(
        self,
        zap: Callable[[GfnRange, Counters], None],
        mark: Callable[[GfnRange, Counters], None],
        zap_list: ZapList,
        memslots: tuple[Memslot, ...],
    ) -> None:
        self._zap = zap
        self._mark = mark
        self.zap_list = zap_list
        self._memslots = memslots

    def execute(
        self, decision: ZapDecision, counters: Counters, *, defer_drain: bool = False
    ) -> ZapReport:
        report = ZapReport(zap_event=decision.zap_event, requested=list(decision.ranges))
        if decision.zap_event:
            counters.zap_events += 1
        counters.ranges_requested += len(decision.ranges)
        if decision.route is not Route.LIST:
            act = self._zap if decision.route is Route.DIRECT else self._mark
            for rng in decision.ranges:
                act(rng, counters)
            return report
        for index, rng in enumerate(decision.ranges):
            parts = split_by_memslots(rng, self._memslots) if decision.split_by_memslot else [rng]
            for part in parts:
                if not self.zap_list.allocate():
                    counters.alloc_failures += 1
                    report.alloc_failed = True
                    self._fall_back(decision, decision.ranges[index:], counters)
                    return report
                report.tickets.append(self.zap_list.add(part, counters))
        if defer_drain:
            report.pending_drain = True
        else:
            report.role = self.zap_list.drain_or_wait(counters)
        return report

    def _fall_back(
        self, decision: ZapDecision, unqueued: tuple[GfnRange, ...], counters: Counters
    ) -> None:
        if decision.on_alloc_failure is AllocFailure.CLEAR_LIST_AND_ZAP_ALL:
            self.zap_list.clear()
            self._zap(ZAP_ALL, counters)
            return
        for rng in unqueued:
            self._zap(rng, counters)
