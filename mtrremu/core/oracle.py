"""The staleness oracle (semantics.md §9).

A leaf is stale for a vCPU when a fault by that vCPU now would give at least one of its pages a
different memory type or IPAT. A huge leaf that a fresh fault would split, but whose pages would
all keep its type, is not stale. The expected answer per page comes from the vCPU's
:class:`~mtrremu.core.fault.FaultPlan`, i.e. from the same functions the fault path uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

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
        by_level[level] = len(gfns)
        keys.append((gfns << 16) | (int(level) << 8) | have.astype(np.int64))
        for i in np.argsort(gfns)[:examples].tolist():
            wanted = int(want[i])
            listed.append(
                StaleLeaf(
                    level,
                    int(gfns[i]),
                    decode_leaf(int(have[i])),
                    decode_leaf(wanted) if wanted else None,
                    mixed=not bool(uniform[i]),
                )
            )
    listed.sort(key=lambda leaf: leaf.base_gfn)
    return StaleReport(
        vcpu,
        sum(by_level.values()),
        by_level,
        tuple(listed[:examples]),
        np.sort(np.concatenate(keys)),
    )
