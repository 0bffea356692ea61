"""The staleness oracle (semantics.md §9).

A leaf is stale for a vCPU when a fault by that vCPU now would give at least one of its pages a
different memory type or IPAT. A huge leaf that a fresh fault would split, but whose pages would
all keep its type, is not stale. The expected answer per page comes from the vCPU's
:class:`~mtrremu.core.fault.FaultPlan`, i.e. from the same functions the fault path uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtrremu.core.ept import EptStore, decode_leaf
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import EptMemtype
from mtrremu.core.units import LEAF_LEVELS_DESCENDING, Level

#: How many stale leaves a report lists in full.
EXAMPLES = 16


@dataclass(frozen=True)
class StaleLeaf:
    level: Level
    base_gfn: int
    have: EptMemtype
    #: What a fresh fault would install at the leaf's first page.
    want: EptMemtype | None
    #: A fresh fault would give the leaf's pages more than one memory type.
    mixed: bool

    def __str__(self) -> str:
        want = "mixed types" if self.mixed else str(self.want)
        return (
            f"{self.level.label} leaf at gfn {self.base_gfn:#x}: {self.have}, fresh fault: {want}"
        )


@dataclass(frozen=True)
class StaleReport:
    """Stale leaves with respect to one vCPU."""

    vcpu: int
    count: int
    by_level: dict[Level, int] = field(default_factory=dict)
    examples: tuple[StaleLeaf, ...] = ()

    @property
    def clean(self) -> bool:
        return self.count == 0


def find_stale(store: EptStore, expected: IntervalMap, vcpu: int) -> StaleReport:
    """Compare every present leaf against ``expected`` (leaf bytes a fresh fault would write)."""
    by_level = dict.fromkeys(LEAF_LEVELS_DESCENDING, 0)
    examples: list[StaleLeaf] = []
    for level, gfns, have in store.leaves():
        uniform, want = expected.uniform(gfns, level.pages)
        stale = ~uniform | (want != have)
        by_level[level] = int(np.count_nonzero(stale))
        for i in np.flatnonzero(stale)[:EXAMPLES].tolist():
            wanted = int(want[i])
            examples.append(
                StaleLeaf(
                    level,
                    int(gfns[i]),
                    decode_leaf(int(have[i])),
                    decode_leaf(wanted) if wanted else None,
                    mixed=not bool(uniform[i]),
                )
            )
    examples.sort(key=lambda leaf: leaf.base_gfn)
    return StaleReport(vcpu, sum(by_level.values()), by_level, tuple(examples[:EXAMPLES]))
