"""Guest-physical address units: gfns, EPT levels and gfn ranges.

Everything inside the core speaks in gfns (4 KiB guest frame numbers); gpas only appear at the
edges (MSR values, requests). Ranges are half-open ``[start, end)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
#: Size suffixes accepted where people type sizes (powers of 1024).
SIZE_SUFFIXES = {"K": KIB, "M": MIB, "G": GIB, "T": TIB}
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MASK = (1 << 64) - 1

#: Bits of gfn covered by one entry at each EPT level (the "span shift").
ENTRIES_PER_TABLE = 512
TABLE_INDEX_BITS = 9

#: Guest-physical address bits a 4-level EPT translates; a zap walk never goes beyond them.
EPT_GPA_BITS = 48
EPT_GFN_LIMIT = 1 << (EPT_GPA_BITS - PAGE_SHIFT)


class Level(enum.IntEnum):
    """An EPT level, numbered like KVM's PG_LEVEL_*: 1 holds 4 KiB leaves, 4 is the root."""

    K4 = 1
    M2 = 2
    G1 = 3
    ROOT = 4

    @property
    def shift(self) -> int:
        """log2 of the number of gfns one entry at this level maps."""
        return (int(self) - 1) * TABLE_INDEX_BITS

    @property
    def pages(self) -> int:
        """Number of 4 KiB pages one entry at this level maps."""
        return 1 << self.shift

    @property
    def label(self) -> str:
        return _LEVEL_LABELS[self]

    @classmethod
    def parse(cls, text: str) -> Level:
        """Parse ``4K``, ``2M`` or ``1G`` (case-insensitive)."""
        for level, label in _LEVEL_LABELS.items():
            if text.strip().upper() == label.upper() and level is not Level.ROOT:
                return level
        raise ValueError(f"unknown mapping level {text!r}: expected 4K, 2M or 1G")


_LEVEL_LABELS = {Level.K4: "4K", Level.M2: "2M", Level.G1: "1G", Level.ROOT: "512G"}

#: Leaf levels, largest first: the order a fault tries them in.
LEAF_LEVELS_DESCENDING = (Level.G1, Level.M2, Level.K4)


def gpa_to_gfn(gpa: int) -> int:
    return (gpa & U64_MASK) >> PAGE_SHIFT


def gfn_to_gpa(gfn: int) -> int:
    return (gfn << PAGE_SHIFT) & U64_MASK


@dataclass(frozen=True, order=True)
class GfnRange:
    """A half-open gfn range ``[start, end)``.

    KVM computes some ranges with 64-bit wrap-around, so ``end <= start`` is representable: such
    a range zaps nothing (see :func:`mtrremu.core.mtrr_state.var_range_gpa`).
    """

    start: int
    end: int

    @property
    def empty(self) -> bool:
        return self.end <= self.start

    @property
    def pages(self) -> int:
        return max(0, self.end - self.start)

    def list_length(self) -> int:
        """The length KVM's zap list sorts by: ``end - start`` in u64 arithmetic."""
        return (self.end - self.start) & U64_MASK

    def overlaps(self, other: GfnRange) -> bool:
        return self.start < other.end and other.start < self.end

    def intersect(self, other: GfnRange) -> GfnRange | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return GfnRange(start, end) if start < end else None

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"


#: The one "zap everything" range every strategy uses: KVM's gfn [0, gpa_to_gfn(~0ULL)).
ZAP_ALL = GfnRange(0, gpa_to_gfn(U64_MASK))
