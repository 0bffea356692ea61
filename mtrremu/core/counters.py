"""The counted costs of zapping and faulting (docs/counters.md), per VM and per event."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mtrremu.core.ept import PopulateOutcome, ZapOutcome
from mtrremu.core.units import ENTRIES_PER_TABLE, Level


@dataclass
class Counters:
    """Event counts. Every field is a plain int so records and reports stay easy to diff.

    * ``zap_events`` — the cover letter's "zap cnt": MTRR writes and CD flips that reached a
      zap path (even when nothing ended up queued); DMA transitions are ``dma_zap_events``.
    * ``ranges_requested`` / ``ranges_queued`` / ``duplicates_dropped`` — ranges strategies
      asked for, ranges added to the zap list (after memslot splitting), identical ones dropped.
    * ``zaps_executed`` — zaps of one range run on the EPT (direct or drained);
      ``drains`` / ``waits`` — times a vCPU drained the zap list / waited for another's drain.
    * ``leaves_removed_*`` / ``entries_visited_*`` — per level; visited counts every entry of a
      present table whose span overlaps the zapped range.
    * ``faults`` — leaves installed; ``refaults`` — faults on a gfn whose leaf a zap removed.
    * ``strategy_failures`` — strategy calls that raised or returned something other than a
      decision; each was replaced by a zap of everything (counted like any zap).
    * ``events_filtered`` — MTRR writes the VM's event filter kept from the strategy.
    * ``straddling_skipped`` — huge leaves a shared-lock zap (patch 12) left in place because
      they straddle the range's edge.
    * ``recalc_*`` — deferred re-evaluation: root entries marked at events, marks pushed down,
      leaves re-evaluated (and changed) and huge leaves split on accesses.
    """

    zap_events: int = 0
    dma_zap_events: int = 0
    ranges_requested: int = 0
    ranges_queued: int = 0
    duplicates_dropped: int = 0
    zaps_executed: int = 0
    drains: int = 0
    waits: int = 0
    alloc_failures: int = 0
    leaves_removed_4k: int = 0
    leaves_removed_2m: int = 0
    leaves_removed_1g: int = 0
    entries_visited_root: int = 0
    entries_visited_1g: int = 0
    entries_visited_2m: int = 0
    entries_visited_4k: int = 0
    tlb_flushes: int = 0
    faults: int = 0
    refaults: int = 0
    hits: int = 0
    mmio_exits: int = 0
    guest_gp: int = 0
    strategy_failures: int = 0
    events_filtered: int = 0
    recalc_marks: int = 0
    recalc_pushdowns: int = 0
    recalc_leaves: int = 0
    recalc_changed: int = 0
    recalc_splits: int = 0
    straddling_skipped: int = 0

    @property
    def leaves_removed(self) -> int:
        return self.leaves_removed_4k + self.leaves_removed_2m + self.leaves_removed_1g

    @property
    def entries_visited(self) -> int:
        return (
            self.entries_visited_root
            + self.entries_visited_1g
            + self.entries_visited_2m
            + self.entries_visited_4k
        )

    @property
    def recalc_work(self) -> int:
        """Deferred re-evaluation work on accesses: entries re-marked by push-downs (a table of
        512 each) plus leaves re-evaluated."""
        return self.recalc_pushdowns * ENTRIES_PER_TABLE + self.recalc_leaves

    def add(self, other: Counters) -> None:
        # On every event's path: the instance dicts hold exactly the counter fields.
        mine = self.__dict__
        for name, value in other.__dict__.items():
            if value:
                mine[name] += value

    def add_zap(self, outcome: ZapOutcome) -> None:
        """Account one executed zap."""
        self.zaps_executed += 1
        self.leaves_removed_4k += outcome.removed[Level.K4]
        self.leaves_removed_2m += outcome.removed[Level.M2]
        self.leaves_removed_1g += outcome.removed[Level.G1]
        self.entries_visited_root += outcome.visited[Level.ROOT]
        self.entries_visited_1g += outcome.visited[Level.G1]
        self.entries_visited_2m += outcome.visited[Level.M2]
        self.entries_visited_4k += outcome.visited[Level.K4]
        if outcome.shared:
            # Patch 12 flushes once per entry it zaps, and leaves straddling huge leaves.
            self.tlb_flushes += outcome.entries_zapped
            self.straddling_skipped += outcome.straddling_skipped
        elif outcome.leaves_removed:
            self.tlb_flushes += 1

    def add_populate(self, outcome: PopulateOutcome) -> None:
        self.faults += outcome.faults
        self.refaults += outcome.refaults

    def as_dict(self) -> dict[str, int]:
        """Every counter plus the three totals, in a stable order."""
        data = asdict(self)
        data["leaves_removed"] = self.leaves_removed
        data["entries_visited"] = self.entries_visited
        data["recalc_work"] = self.recalc_work
        return data

    def copy(self) -> Counters:
        return Counters(**asdict(self))


#: The counter fields, in declaration order.
COUNTER_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Counters))
