"""The staleness oracle.

A leaf is stale for a vCPU when a fault by that vCPU now would give at least one of its pages a
different memory type or IPAT. A huge leaf that a fresh fault would split, but whose pages would
all keep its type, is not stale. The expected answer per page comes from the vCPU's
:class:`~mtrremu.core.fault.FaultPlan`, i.e. from the same functions the fault path uses.

Two questions are asked of it:

* **at quiescence** (every vCPU holds the same MTRRs and CR0.CD): is any leaf stale? The EPT is
  shared and vCPUs may disagree while they boot, so this is when "stale" is unambiguous.
* **after a vCPU's own memtype event** (an MTRR write or a CR0.CD toggle the strategy was asked
  about, or a DMA transition): did the event leave leaves stale for that vCPU which were not
  stale for it before (:func:`newly_stale`)? A zap on an event exists to prevent exactly that,
  so this catches a missing zap even when a later zap hides it before the vCPUs agree. Faithful
  strategies declare the KVM behaviour that does this on purpose as a :class:`Gap`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from mtrremu.core.ept import EptStore, decode_leaf
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import EptMemtype
from mtrremu.core.units import LEAF_LEVELS_DESCENDING, PAGE_SHIFT, Level

#: How many stale leaves a report lists in full.
EXAMPLES = 16


@dataclass(frozen=True)
class StaleLeaf:
    level: Level
    base_gpa: int
    have: EptMemtype
    #: What a fresh fault would install at the leaf's first page.
    want: EptMemtype | None
    #: A fresh fault would give the leaf's pages more than one memory type.
    mixed: bool

    def __str__(self) -> str:
        want = "mixed types" if self.mixed else str(self.want)
        return (
            f"{self.level.label} leaf at gpa {self.base_gpa:#x}: {self.have}, fresh fault: {want}"
        )


def _no_keys() -> npt.NDArray[np.int64]:
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class StaleReport:
    """Stale leaves with respect to one vCPU.

    ``keys`` identifies every stale leaf, sorted: ``gfn << 16 | level << 8 | leaf byte``.
    """

    vcpu: int
    count: int
    by_level: dict[Level, int] = field(default_factory=dict)
    examples: tuple[StaleLeaf, ...] = ()
    keys: npt.NDArray[np.int64] = field(default_factory=_no_keys)

    @property
    def clean(self) -> bool:
        return self.count == 0


def find_stale(
    store: EptStore, expected: IntervalMap, vcpu: int, examples: int = EXAMPLES
) -> StaleReport:
    """Compare every present leaf against ``expected`` (leaf bytes a fresh fault would write).

    The report lists up to ``examples`` stale leaves, lowest gfn first.
    """
    by_level = dict.fromkeys(LEAF_LEVELS_DESCENDING, 0)
    listed: list[StaleLeaf] = []
    keys = [_no_keys()]
    for level, gfns, have, uniform, want in store.mismatches(expected):
        by_level[level] += len(gfns)
        keys.append((gfns << 16) | (int(level) << 8) | have.astype(np.int64))
        for i in np.argsort(gfns)[:examples].tolist():
            wanted = int(want[i])
            listed.append(
                StaleLeaf(
                    level,
                    int(gfns[i]) << PAGE_SHIFT,
                    decode_leaf(int(have[i])),
                    decode_leaf(wanted) if wanted else None,
                    mixed=not bool(uniform[i]),
                )
            )
    listed.sort(key=lambda leaf: leaf.base_gpa)
    return StaleReport(
        vcpu,
        sum(by_level.values()),
        by_level,
        tuple(listed[:examples]),
        np.sort(np.concatenate(keys)),
    )


@dataclass
class StalenessLog:
    """What the oracle found while ``VmConfig.track_staleness`` is on (see :mod:`.oracle`).

    **At quiescent points.** After an event that may change memory types (an accepted MTRR
    write that changed the registers as read back or the pair order, a CR0.CD flip, a DMA
    transition), the next time every vCPU holds the same MTRRs and
    CR0.CD the oracle runs: ``checks`` counts those points, ``stale_points`` the ones with stale
    leaves, and ``stale_leaves_max`` the most stale leaves seen at one. A fault never adds a
    stale leaf, so checking only after such changes is exact. Inside a burst the check waits for
    the round's drain.

    **After each event.** For every event the strategy was asked about, and every DMA transition,
    once its zaps have run (in a burst: after the round's drain): ``event_checks`` counts the
    events that changed what the acting vCPU expects; ``stale_events`` those that left leaves
    newly stale for that vCPU beyond what the strategy's declared gaps explain;
    ``stale_event_leaves_max`` the most such leaves after one event; ``excused`` the events a
    declared gap explained, by gap; ``first_stale_event`` describes the first stale event.
    """

    checks: int = 0
    stale_points: int = 0
    stale_leaves_max: int = 0
    event_checks: int = 0
    stale_events: int = 0
    stale_event_leaves_max: int = 0
    excused: dict[str, int] = field(default_factory=dict)
    first_stale_event: str = ""


#: The counts of a :class:`StalenessLog` (besides ``excused`` and ``first_stale_event``).
STALENESS_COUNTS = (
    "checks",
    "stale_points",
    "stale_leaves_max",
    "event_checks",
    "stale_events",
    "stale_event_leaves_max",
)


class Gap(enum.Enum):
    """A documented way a faithful strategy leaves a vCPU's own view stale after its event.

    A strategy declares the gaps it reproduces on purpose (``StrategySpec.known_gaps``); the
    oracle then counts what a gap explains as excused, by name, instead of as stale. What a gap
    does not explain stays stale.
    """

    #: No zap on a guest CR0.CD toggle (released KVM with KVM_X86_QUIRK_CD_NW_CLEARED on):
    #: excuses every leaf the toggle left stale for the toggling vCPU.
    CD_TOGGLE = "cd-toggle"
    #: A variable range rewritten while MTRRs are enabled is zapped at its new span only (KVM
    #: computes the span after the write): excuses the leaves overlapping the pair's old span.
    MOVED_RANGE = "moved-range"
    #: A zap under the MMU lock held for read (patch 12) leaves a huge leaf straddling the
    #: range's edge in place: excuses the leaves that straddle an edge of the event's ranges.
    STRADDLING_LEAF = "straddling-leaf"


def leaf_key_ranges(keys: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], ...]:
    """``(base gfns, pages)`` of the leaves ``keys`` (as :attr:`StaleReport.keys` encodes them)."""
    levels = (keys >> 8) & 0xFF
    return keys >> 16, np.left_shift(np.int64(1), (levels - 1) * 9)


def stale_keys(store: EptStore, expected: IntervalMap) -> npt.NDArray[np.int64]:
    """Keys (sorted) of every leaf disagreeing with ``expected``: :func:`find_stale`'s, without
    the report."""
    return np.sort(_keys(store, expected, None))


def stale_keys_near(
    store: EptStore,
    expected: IntervalMap,
    spans: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
) -> npt.NDArray[np.int64]:
    """Keys (sorted) of the leaves disagreeing with ``expected`` among those overlapping the
    union of ``spans`` (each ``(starts, ends)``); some leaves outside may be reported too."""
    starts = np.concatenate([s for s, _ in spans])
    if not len(starts):
        return _no_keys()
    ends = np.concatenate([e for _, e in spans])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    first = np.ones(len(starts), dtype=bool)
    first[1:] = starts[1:] > reach[:-1]
    at = np.flatnonzero(first)
    merged = (starts[at], np.maximum.reduceat(ends, at))
    return np.sort(_keys(store, expected, merged))


def _keys(
    store: EptStore, expected: IntervalMap, within: tuple[npt.NDArray[np.int64], ...] | None
) -> npt.NDArray[np.int64]:
    parts = [_no_keys()]
    ranges = None if within is None else (within[0], within[1])
    for level, gfns, have, _, _ in store.mismatches(expected, ranges):
        parts.append(_packed(level, gfns, have))
    return np.concatenate(parts)


def _packed(
    level: Level, gfns: npt.NDArray[np.int64], have: npt.NDArray[np.uint8]
) -> npt.NDArray[np.int64]:
    """Keys of leaves of ``level`` at ``gfns`` holding ``have`` (as :class:`StaleReport`)."""
    return (gfns << 16) | (int(level) << 8) | have.astype(np.int64)


def newly_stale(store: EptStore, before: IntervalMap, after: IntervalMap) -> npt.NDArray[np.int64]:
    """Keys (sorted) of the leaves that agree with ``before`` and disagree with ``after``.

    ``before`` and ``after`` are one vCPU's expected bytes around its event: these are the
    leaves the event left mapped with a type that vCPU no longer gets. Only the gfns where the
    two maps differ are looked at, so an event that changes little costs little.
    """
    within = before.differences(after)
    if not len(within[0]):
        return _no_keys()
    # One scan: the leaves disagreeing with ``after``, and of them those ``before`` agreed with.
    parts = [_no_keys()]
    for level, gfns, have, _, _ in store.mismatches(after, within):
        uniform, want = before.uniform(gfns, level.pages)
        agreed = uniform & (want == have)
        parts.append(_packed(level, gfns[agreed], have[agreed]))
    return np.sort(np.concatenate(parts))
