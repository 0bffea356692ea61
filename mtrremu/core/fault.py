"""What a fault by one vCPU installs: the leaf's level (huge-page reduction) and memory type.

:class:`FaultView` answers for one gfn (the reference semantics, used on single accesses);
:class:`FaultPlan` answers the same questions for whole arrays of regions (bulk faults and the
staleness oracle) and is checked against :class:`FaultView` by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mtrremu.core.config import MemslotKind, VmConfig
from mtrremu.core.ept import DESCEND, MAP_HERE, SKIP, encode_leaf
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import (
    EptMemtype,
    Profile,
    ept_memtype,
    guest_memory_type,
    range_is_consistent,
)
from mtrremu.core.mtrr_state import MtrrState
from mtrremu.core.units import LEAF_LEVELS_DESCENDING, Level

Int64Array = npt.NDArray[np.int64]
UInt8Array = npt.NDArray[np.uint8]


class Memslots:
    """The VM's memslots as sorted arrays, for scalar and vectorised membership questions."""

    def __init__(self, config: VmConfig) -> None:
        slots = config.sorted_memslots()
        self.slots = slots
        self.starts: Int64Array = np.array([s.base_gfn for s in slots], dtype=np.int64)
        self.ends: Int64Array = np.array([s.end_gfn for s in slots], dtype=np.int64)
        self.device: npt.NDArray[np.bool_] = np.array(
            [s.kind is MemslotKind.DEVICE for s in slots], dtype=bool
        )

    def edges(self) -> list[int]:
        return sorted({*self.starts.tolist(), *self.ends.tolist()})

    def index_of(self, gfn: int) -> int:
        """The slot holding ``gfn``, or -1."""
        i = int(np.searchsorted(self.starts, gfn, side="right")) - 1
        return i if i >= 0 and gfn < int(self.ends[i]) else -1

    def contains(self, starts: Int64Array, pages: int) -> npt.NDArray[np.bool_]:
        """Whether each ``[s, s + pages)`` lies inside one slot."""
        i = np.searchsorted(self.starts, starts, side="right") - 1
        safe = np.maximum(i, 0)
        return (i >= 0) & (starts + pages <= self.ends[safe])

    def overlaps(self, starts: Int64Array, pages: int) -> npt.NDArray[np.bool_]:
        """Whether each ``[s, s + pages)`` overlaps some slot."""
        i = np.searchsorted(self.starts, starts + (pages - 1), side="right") - 1
        safe = np.maximum(i, 0)
        return (i >= 0) & (self.ends[safe] > starts)

    def pages_in(self, start: int, end: int) -> int:
        """How many pages of ``[start, end)`` lie inside some slot."""
        lo = np.clip(self.starts, start, end)
        hi = np.clip(self.ends, start, end)
        return int((hi - lo).sum())


@dataclass(frozen=True)
class FaultView:
    """Everything a fault by one vCPU depends on, read at the moment of the fault."""

    profile: Profile
    config: VmConfig
    memslots: Memslots
    noncoherent_dma: bool
    cd: bool
    mtrr: MtrrState

    @property
    def reduces_huge_pages(self) -> bool:
        """Whether guest MTRRs restrict the mapping level (while honoured, whatever CR0.CD is)."""
        return self.profile.honours_guest_mtrrs and self.config.tdp and self.noncoherent_dma

    def memtype(self, gfn: int, device: bool) -> EptMemtype:
        """§5: the memory type and IPAT of a leaf faulted in at ``gfn``."""
        config = self.config
        return ept_memtype(
            self.profile,
            tdp=config.tdp,
            noncoherent_dma=self.noncoherent_dma,
            quirk_cd_nw_cleared=config.quirk_cd_nw_cleared,
            cd=self.cd,
            device=device,
            guest_type=lambda: guest_memory_type(
                self.mtrr, gfn, config.feature_mtrr, config.precedence
            ),
        )

    def leaf_byte(self, gfn: int) -> int:
        """The encoded leaf for ``gfn``, or 0 outside every memslot."""
        slot = self.memslots.index_of(gfn)
        if slot < 0:
            return 0
        return encode_leaf(self.memtype(gfn, bool(self.memslots.device[slot])))

    def level_allowed(self, level: Level, region: int) -> bool:
        """Whether a leaf of ``level`` may map the aligned region starting at ``region``."""
        if level > self.config.max_mapping_level:
            return False
        starts = np.array([region], dtype=np.int64)
        if not bool(self.memslots.contains(starts, level.pages)[0]):
            return False
        return not self.reduces_huge_pages or range_is_consistent(self.mtrr, region, level.pages)

    def level(self, gfn: int) -> Level:
        """The level a fault on ``gfn`` maps at: the largest allowed, stepping 1G → 2M → 4K."""
        for level in LEAF_LEVELS_DESCENDING:
            region = (gfn >> level.shift) << level.shift
            if level is Level.K4 or self.level_allowed(level, region):
                return level
        raise AssertionError("unreachable")

    def breakpoints(self) -> list[int]:
        """Gfns where the answers of this view can change."""
        return sorted({*self.memslots.edges(), *self.mtrr.breakpoints()})


class FaultPlan:
    """:class:`FaultView`'s answers for arrays of aligned regions (see ``PopulatePlan``)."""

    def __init__(self, view: FaultView) -> None:
        self.view = view
        points = view.breakpoints()
        self.partition: Int64Array = np.array(points, dtype=np.int64)
        self.values = IntervalMap.build(points, view.leaf_byte)
        self._mtrr_points: Int64Array = np.array(view.mtrr.breakpoints(), dtype=np.int64)
        self._verdicts: dict[tuple[Level, int], bool] = {}

    def _consistent(self, level: Level, starts: Int64Array) -> npt.NDArray[np.bool_]:
        """KVM's consistency verdict per region; regions inside one MTRR segment share it."""
        view = self.view
        if not view.reduces_huge_pages:
            return np.ones(len(starts), dtype=bool)
        first = np.searchsorted(self._mtrr_points, starts, side="right")
        last = np.searchsorted(self._mtrr_points, starts + (level.pages - 1), side="right")
        verdict = np.empty(len(starts), dtype=bool)
        for i in np.flatnonzero(first != last).tolist():
            verdict[i] = range_is_consistent(view.mtrr, int(starts[i]), level.pages)
        inside = np.flatnonzero(first == last)
        if len(inside):
            segments = first[inside]
            for segment in np.unique(segments).tolist():
                key = (level, segment)
                if key not in self._verdicts:
                    sample = int(starts[inside[np.argmax(segments == segment)]])
                    self._verdicts[key] = range_is_consistent(view.mtrr, sample, level.pages)
                verdict[inside[segments == segment]] = self._verdicts[key]
        return verdict

    def classify(self, level: Level, starts: Int64Array) -> tuple[UInt8Array, UInt8Array]:
        slots = self.view.memslots
        overlaps = slots.overlaps(starts, level.pages)
        codes = np.where(overlaps, DESCEND, SKIP).astype(np.uint8)
        if level is Level.ROOT:
            return codes, np.zeros(len(starts), dtype=np.uint8)
        if level is Level.K4:
            allowed = overlaps
        elif level > self.view.config.max_mapping_level:
            allowed = np.zeros(len(starts), dtype=bool)
        else:
            allowed = slots.contains(starts, level.pages)
            if allowed.any():
                allowed[allowed] = self._consistent(level, starts[allowed])
        codes[allowed] = MAP_HERE
        values = self.values.values[self.values.segment_of(starts)]
        return codes, values
