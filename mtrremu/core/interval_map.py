"""A piecewise-constant map over gfns, for vectorised questions about whole ranges.

MTRRs and memslots cut the gfn space into a few hundred segments at most; inside one segment
every page gets the same answer. Maps are built by evaluating a scalar rule once per segment,
so they agree with that rule by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

from mtrremu.core.units import EPT_GFN_LIMIT

Int64Array = npt.NDArray[np.int64]
UInt8Array = npt.NDArray[np.uint8]


class IntervalMap:
    """Segments ``[starts[i], starts[i+1])`` with value ``values[i]``; the last runs to the end.

    Adjacent segments never share a value, so a range lies in one segment exactly when its
    value is uniform.
    """

    __slots__ = ("starts", "values")

    def __init__(self, starts: Int64Array, values: UInt8Array) -> None:
        keep = np.ones(len(starts), dtype=bool)
        keep[1:] = values[1:] != values[:-1]
        self.starts: Int64Array = starts[keep]
        self.values: UInt8Array = values[keep]

    @classmethod
    def build(cls, breakpoints: Iterable[int], value_at: Callable[[int], int]) -> IntervalMap:
        """Evaluate ``value_at`` at the start of every segment the breakpoints cut out."""
        points = sorted({0, *(p for p in breakpoints if 0 <= p < EPT_GFN_LIMIT)})
        starts = np.array(points, dtype=np.int64)
        values = np.array([value_at(p) for p in points], dtype=np.uint8)
        return cls(starts, values)

    def segment_of(self, gfns: Int64Array) -> Int64Array:
        """Index of the segment holding each gfn."""
        return np.searchsorted(self.starts, gfns, side="right").astype(np.int64) - 1

    def value_at(self, gfn: int) -> int:
        return int(self.values[int(np.searchsorted(self.starts, gfn, side="right")) - 1])

    def uniform(self, starts: Int64Array, pages: int) -> tuple[npt.NDArray[np.bool_], UInt8Array]:
        """For ranges ``[s, s + pages)``: whether each is uniform, and its value at ``s``."""
        first = self.segment_of(starts)
        last = self.segment_of(starts + (pages - 1))
        return first == last, self.values[first]

    def same_as(self, other: IntervalMap) -> bool:
        """Whether both maps give every gfn the same value (segments are kept merged, so equal
        maps have equal arrays)."""
        return np.array_equal(self.starts, other.starts) and np.array_equal(
            self.values, other.values
        )

    def differences(self, other: IntervalMap) -> tuple[Int64Array, Int64Array]:
        """``(starts, ends)`` of the gfn ranges where ``other`` holds a different value, sorted
        and disjoint (ranges abutting each other are not merged)."""
        points = np.union1d(self.starts, other.starts)
        differ = self.values[self.segment_of(points)] != other.values[other.segment_of(points)]
        ends = np.append(points[1:], np.int64(EPT_GFN_LIMIT))
        return points[differ], ends[differ]
