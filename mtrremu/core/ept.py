"""The EPT store: a 4-level table tree of one-byte entries, held in numpy arrays.

Each level keeps a pool of 512-entry tables (entry bytes, child table ids, base gfn per table).
The root is table 0 of the level-4 pool. Leaves live at level 3 (1 GiB), 2 (2 MiB) and 1
(4 KiB). Like KVM's TDP MMU, zaps remove leaves only: page tables stay, so later zap walks still
visit their (now non-present) entries.

Entry byte::

    bit 7  LEAF    present leaf
    bit 6  ZAPPED  not present; a zap removed the leaf that mapped this span (refault tracking)
    bit 5  MMIO    not present; KVM's MMIO marker (4 KiB level, outside every memslot)
    bit 4  RECALC  present leaf or table pointer: memory types at and below this entry must be
                   re-evaluated before use (Xen's EMT-invalid mark; see :meth:`EptStore.mark`)
    bit 3  IPAT    leaf: ignore guest PAT
    bits 2:0       leaf: memory type

Bulk operations walk the tree level by level over whole batches of tables, so their cost is a
few numpy passes over the touched entries rather than Python work per page.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import EptMemtype
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import (
    ENTRIES_PER_TABLE,
    EPT_GFN_LIMIT,
    LEAF_LEVELS_DESCENDING,
    GfnRange,
    Level,
)

LEAF = 0x80
ZAPPED = 0x40
MMIO = 0x20
RECALC = 0x10
IPAT = 0x08
TYPE_BITS = 0x07

#: Codes a :class:`PopulatePlan` gives an entry.
SKIP, MAP_HERE, DESCEND = 0, 1, 2

Int64Array = npt.NDArray[np.int64]
UInt8Array = npt.NDArray[np.uint8]
_COLUMNS = np.arange(ENTRIES_PER_TABLE, dtype=np.int64)


def encode_leaf(memtype: EptMemtype) -> int:
    return LEAF | (IPAT if memtype.ipat else 0) | int(memtype.type)


def decode_leaf(byte: int) -> EptMemtype:
    return EptMemtype(MemType(byte & TYPE_BITS), ipat=bool(byte & IPAT))


@dataclass(frozen=True)
class Entry:
    """Where a walk for one gfn ends: a leaf, or the deepest non-present entry on its path."""

    level: Level
    base_gfn: int
    byte: int
    #: This entry or one above it on the path carries a re-evaluation mark.
    recalc: bool = False

    @property
    def present(self) -> bool:
        return bool(self.byte & LEAF)

    @property
    def zapped(self) -> bool:
        return bool(self.byte & ZAPPED)

    @property
    def mmio(self) -> bool:
        return bool(self.byte & MMIO)

    @property
    def memtype(self) -> EptMemtype:
        return decode_leaf(self.byte)


@dataclass
class ZapOutcome:
    """What one zap of a range did: leaves removed and entries visited, per level."""

    removed: dict[Level, int] = field(
        default_factory=lambda: dict.fromkeys(LEAF_LEVELS_DESCENDING, 0)
    )
    visited: dict[Level, int] = field(default_factory=lambda: dict.fromkeys(Level, 0))
    #: Run under the MMU lock held for read (:meth:`EptStore.zap_shared`).
    shared: bool = False
    #: Shared-lock zaps only: entries zapped (leaves and whole subtrees), one TLB flush each.
    entries_zapped: int = 0
    #: Shared-lock zaps only: huge leaves straddling the range's edge, left in place.
    straddling_skipped: int = 0

    @property
    def leaves_removed(self) -> int:
        return sum(self.removed.values())

    @property
    def entries_visited(self) -> int:
        return sum(self.visited.values())


@dataclass
class MarkOutcome:
    """What marking a range for re-evaluation did: root entries visited and marked."""

    visited: int = 0
    marked: int = 0


@dataclass
class RecalcOutcome:
    """What resolving re-evaluation marks on an access did (see :meth:`EptStore.resolve`)."""

    #: Marked table pointers whose mark moved down to the present entries of their table.
    pushdowns: int = 0
    #: Marked present leaves whose memory type was recomputed.
    leaves: int = 0
    #: Of those, the leaves whose type or IPAT changed.
    changed: int = 0
    #: Marked huge leaves whose span no longer has one type, split into marked smaller leaves.
    splits: int = 0


@dataclass
class PopulateOutcome:
    """What a bulk fault installed: one fault per leaf, and how many of those were refaults."""

    installed: dict[Level, int] = field(
        default_factory=lambda: dict.fromkeys(LEAF_LEVELS_DESCENDING, 0)
    )
    refaults: int = 0

    @property
    def faults(self) -> int:
        return sum(self.installed.values())


class PopulatePlan(Protocol):
    """How a fault by one vCPU maps each region (implemented by :mod:`mtrremu.core.fault`)."""

    #: Sorted gfns; an entry or table whose span holds none of them strictly inside is uniform.
    partition: Int64Array

    def classify(self, level: Level, starts: Int64Array) -> tuple[UInt8Array, UInt8Array]:
        """For entries at ``level`` spanning ``[s, s + level.pages)``: code and leaf byte.

        The code is :data:`SKIP` (no memory there), :data:`MAP_HERE` (a leaf of this level is
        allowed) or :data:`DESCEND` (split further).
        """
        ...


class _LevelStep(Protocol):
    def __call__(
        self,
        level: Level,
        tables: npt.NDArray[np.int32],
        base: Int64Array,
        lo: Int64Array,
        hi: Int64Array,
    ) -> list[npt.NDArray[np.int32]]: ...


class _Pool:
    """The tables of one level."""

    def __init__(self, level: Level, capacity: int) -> None:
        self.level = level
        self.ent: UInt8Array = np.zeros((capacity, ENTRIES_PER_TABLE), dtype=np.uint8)
        self.child: npt.NDArray[np.int32] | None = (
            np.full((capacity, ENTRIES_PER_TABLE), -1, dtype=np.int32) if level > Level.K4 else None
        )
        self.base: Int64Array = np.full(capacity, -1, dtype=np.int64)
        self.top = 0
        self.free: list[int] = []

    @property
    def live(self) -> int:
        return self.top - len(self.free)

    @property
    def nbytes(self) -> int:
        child = 0 if self.child is None else self.child.nbytes
        return self.ent.nbytes + child + self.base.nbytes

    def _grow(self, needed: int) -> None:
        capacity = len(self.base)
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity)
        ent = np.zeros((new, ENTRIES_PER_TABLE), dtype=np.uint8)
        ent[:capacity] = self.ent
        self.ent = ent
        if self.child is not None:
            child = np.full((new, ENTRIES_PER_TABLE), -1, dtype=np.int32)
            child[:capacity] = self.child
            self.child = child
        base = np.full(new, -1, dtype=np.int64)
        base[:capacity] = self.base
        self.base = base

    def allocate(self, bases: Int64Array, fill: UInt8Array) -> npt.NDArray[np.int32]:
        """New tables covering regions starting at ``bases``; every entry starts as ``fill``."""
        count = len(bases)
        reuse = min(count, len(self.free))
        reused = [self.free.pop() for _ in range(reuse)]
        fresh = np.arange(self.top, self.top + count - reuse, dtype=np.int32)
        self._grow(self.top + len(fresh))
        self.top += len(fresh)
        ids = np.concatenate([np.array(reused, dtype=np.int32), fresh])
        self.base[ids] = bases
        self.ent[ids] = fill[:, None]
        return ids

    def release(self, ids: npt.NDArray[np.int32]) -> None:
        self.base[ids] = -1
        self.ent[ids] = 0
        if self.child is not None:
            self.child[ids] = -1
        self.free.extend(int(i) for i in ids)

    def live_ids(self) -> npt.NDArray[np.int32]:
        return np.flatnonzero(self.base[: self.top] >= 0).astype(np.int32)


@dataclass(frozen=True)
class _Block:
    """Entries of one level: table rows (one id, a run as a slice, or ids) and columns.

    ``first_gfns`` holds, per row, the gfn of the row's first entry in ``cols``.
    """

    level: Level
    rows: int | slice | npt.NDArray[np.int32]
    cols: slice
    first_gfns: Int64Array


def _overlapping(
    starts: Int64Array, pages: int, ranges: tuple[Int64Array, Int64Array]
) -> npt.NDArray[np.bool_]:
    """Whether each ``[s, s + pages)`` overlaps one of the sorted, disjoint ``ranges``."""
    range_starts, range_ends = ranges
    # The last range starting before each span's end overlaps it iff it ends after its start.
    last = np.searchsorted(range_starts, starts + pages, side="left") - 1
    return (last >= 0) & (range_ends[np.maximum(last, 0)] > starts)


def merge_runs(
    chunks: Iterable[tuple[Int64Array, Int64Array, Int64Array]],
) -> Iterator[tuple[Level, int, int, int]]:
    """Runs ``(level, first gfn, leaves, byte)`` of leaves given as ascending chunks of
    ``(levels, gfns, bytes)``; a run may continue from one chunk into the next."""
    current: list[int] | None = None
    for levels, gfns, values in chunks:
        if not len(gfns):
            continue
        pages = np.left_shift(1, (levels - 1) * 9)
        breaks = np.ones(len(gfns), dtype=bool)
        breaks[1:] = (
            (levels[1:] != levels[:-1])
            | (values[1:] != values[:-1])
            | (gfns[1:] != gfns[:-1] + pages[:-1])
        )
        starts = np.flatnonzero(breaks)
        ends = np.append(starts[1:], len(gfns))
        for first, stop in zip(starts.tolist(), ends.tolist(), strict=True):
            level, gfn, byte = int(levels[first]), int(gfns[first]), int(values[first])
            if current is not None and (
                (current[0], current[3]) == (level, byte)
                and current[1] + current[2] * (1 << ((level - 1) * 9)) == gfn
            ):
                current[2] += stop - first
                continue
            if current is not None:
                yield Level(current[0]), current[1], current[2], current[3]
            current = [level, gfn, stop - first, byte]
    if current is not None:
        yield Level(current[0]), current[1], current[2], current[3]


def _as_block(ids: npt.NDArray[np.int32]) -> slice | npt.NDArray[np.int32]:
    """A slice when the ids are one ascending run (views, no copies), else the ids themselves."""
    if len(ids) == 1:
        first = int(ids[0])
        return slice(first, first + 1)
    if len(ids) and int(ids[-1]) - int(ids[0]) + 1 == len(ids) and bool(np.all(np.diff(ids) == 1)):
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


@dataclass(frozen=True)
class EptImage:
    """An EPT's complete content as plain arrays, independent of where tables sit in memory:
    per level (root to 4 KiB), the base gfns of its tables in ascending order and their
    entry bytes (one row of 512 per table). Which table an entry points to is implied by the
    bases (the table below covering the entry's span), so an image has one form per EPT."""

    bases: dict[Level, Int64Array]
    entries: dict[Level, UInt8Array]
    #: Tables made for MMIO markers (:attr:`EptStore.mmio_tables`).
    mmio_tables: int

    def same_as(self, other: EptImage) -> bool:
        return self.mmio_tables == other.mmio_tables and all(
            np.array_equal(self.bases[level], other.bases[level])
            and np.array_equal(self.entries[level], other.entries[level])
            for level in Level
        )


def _valid_bytes(level: Level) -> npt.NDArray[np.bool_]:
    """Which entry bytes may stand at ``level`` in an entry that points to no table."""
    valid = np.zeros(256, dtype=bool)
    valid[0] = valid[ZAPPED] = True
    if level is Level.K4:
        valid[MMIO] = valid[MMIO | ZAPPED] = True
    if level is not Level.ROOT:
        for memtype in (MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB):
            for extra in (0, IPAT, RECALC, IPAT | RECALC):
                valid[LEAF | extra | int(memtype)] = True
    return valid


#: Tables a walk or :meth:`EptStore.mismatches` takes at once (16 MiB of entries).
_SCAN_TABLES = 32768
#: Spans :meth:`EptStore.take_touched` keeps before giving up (then the oracle scans all).
TOUCHED_SPANS = 4096
#: How many pieces at most a bulk fault is walked in (see :meth:`EptStore.populate`).
_POPULATE_PIECES = 64


def _table_span(level: Level) -> int:
    """Gfns one table of ``level`` covers."""
    return ENTRIES_PER_TABLE * level.pages


def table_bound(spans: Iterable[GfnRange], level: Level, mmio_tables: int) -> int:
    """The most tables ``level`` can hold in an EPT whose faults stay within ``spans`` (the
    memslots) and whose MMIO markers made at most ``mmio_tables`` tables."""
    if level is Level.ROOT:
        return 1
    cover = _table_span(level)
    return mmio_tables + sum((s.end - 1) // cover - s.start // cover + 1 for s in spans)


class EptStore:
    """The VM's one EPT. Not thread-safe: the VM serialises access under its MMU lock.

    Its size is bounded by the guest's memory: at worst (every page a 4 KiB leaf) about one
    byte per 4 KiB page plus the tables above, which is what a server's memory limits bound.
    """

    def __init__(self, mmio_table_budget: int = 1 << 30) -> None:
        self._pools = {
            Level.ROOT: _Pool(Level.ROOT, 1),
            Level.G1: _Pool(Level.G1, 4),
            Level.M2: _Pool(Level.M2, 16),
            Level.K4: _Pool(Level.K4, 64),
        }
        self._pools[Level.ROOT].allocate(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.uint8))
        self._leaves = dict.fromkeys(LEAF_LEVELS_DESCENDING, 0)
        #: Tables made for MMIO markers so far, and how many may be (memory the guest's own
        #: memslots do not bound; see :meth:`mark_mmio`).
        self.mmio_tables = 0
        self.mmio_table_budget = mmio_table_budget
        #: Some entry was ever marked for re-evaluation: only then do accesses resolve marks and
        #: the oracle look for them, so stores that never see a mark pay nothing for them.
        self.marked = False
        #: Gfn spans where leaves were installed or re-evaluated since :meth:`take_touched`, if
        #: kept (:meth:`keep_touched`); ``None`` in the list's place once it overflowed.
        self._touched: list[tuple[int, int]] | None = None
        self._keeping = False
        #: Bumped by every change to a table or entry: equal generations, equal stores.
        self.generation = 0
        # The last zap's (generation after it, range, entries visited): zapping the same range
        # of an unchanged store again visits the same entries and removes nothing.
        self._last_zap: tuple[int, int, int, dict[Level, int]] | None = None

    # -- introspection -------------------------------------------------------------------

    def leaf_counts(self) -> dict[Level, int]:
        return dict(self._leaves)

    @property
    def leaf_total(self) -> int:
        return sum(self._leaves.values())

    def table_counts(self) -> dict[Level, int]:
        return {level: pool.live for level, pool in self._pools.items()}

    @property
    def nbytes(self) -> int:
        """Bytes the store's arrays hold (capacity included)."""
        return sum(pool.nbytes for pool in self._pools.values())

    def image(self) -> EptImage:
        """This EPT as an :class:`EptImage` (a copy)."""
        bases: dict[Level, Int64Array] = {}
        entries: dict[Level, UInt8Array] = {}
        for level, pool in self._pools.items():
            ids = pool.live_ids()
            ids = ids[np.argsort(pool.base[ids], kind="stable")]
            bases[level] = pool.base[ids].copy()
            entries[level] = pool.ent[ids].copy()
        return EptImage(bases, entries, self.mmio_tables)

    @classmethod
    def from_image(cls, image: EptImage, mmio_table_budget: int) -> EptStore:
        """The EPT ``image`` describes, after checking that it is one :meth:`image` could have
        produced: one root; every other table under an entry of the level above; valid entry
        bytes at each level (a pointer carries nothing but a re-evaluation mark); at most
        ``mmio_table_budget`` marker tables. Raises :class:`ValueError` naming the first
        problem found."""
        if not 0 <= image.mmio_tables <= mmio_table_budget:
            raise ValueError(
                f"{image.mmio_tables} MMIO marker tables, over the budget of {mmio_table_budget}"
            )
        for level in Level:
            bases, entries = image.bases[level], image.entries[level]
            if bases.dtype != np.int64 or bases.ndim != 1:
                raise ValueError(f"level {level.label}: table bases are not a list of int64")
            if entries.dtype != np.uint8 or entries.shape != (len(bases), ENTRIES_PER_TABLE):
                raise ValueError(
                    f"level {level.label}: entries are not {len(bases)} rows of 512 bytes"
                )
            if len(bases) > 1 and not bool(np.all(np.diff(bases) > 0)):
                raise ValueError(f"level {level.label}: table bases are not strictly ascending")
        if image.bases[Level.ROOT].tolist() != [0]:
            raise ValueError("the EPT must have exactly one root table, at gfn 0")
        store = cls(mmio_table_budget)
        store.mmio_tables = image.mmio_tables
        ids = {Level.ROOT: np.zeros(1, dtype=np.int32)}
        for level in LEAF_LEVELS_DESCENDING:
            up = Level(level + 1)
            ids[level] = store._attach(level, image.bases[level], image.bases[up], ids[up])
        for level, pool in store._pools.items():
            entries = image.entries[level]
            pool.ent[ids[level]] = entries
            if pool.child is None:
                ok = _valid_bytes(level)[entries]
            else:
                pointers = pool.child[ids[level]] >= 0
                ok = np.where(
                    pointers, (entries & (0xFF ^ RECALC)) == 0, _valid_bytes(level)[entries]
                )
            if not bool(ok.all()):
                row, col = (int(x[0]) for x in np.nonzero(~ok))
                raise ValueError(
                    f"level {level.label}: entry {col} of the table at gfn "
                    f"{int(image.bases[level][row]):#x} holds {int(entries[row, col]):#04x}, "
                    "which cannot stand there"
                )
            if level is not Level.ROOT:
                store._leaves[level] = int(np.count_nonzero(entries >= LEAF))
            store.marked |= bool((entries & RECALC).any())
        return store

    def _attach(
        self,
        level: Level,
        bases: Int64Array,
        parent_bases: Int64Array,
        parent_ids: npt.NDArray[np.int32],
    ) -> npt.NDArray[np.int32]:
        """New tables of ``level`` at ``bases``, each pointed to by the entry of the level
        above (tables at ``parent_bases``, ids ``parent_ids``) whose span it covers."""
        up = Level(level + 1)
        if not len(bases):
            return np.zeros(0, dtype=np.int32)
        parent_base = bases - bases % _table_span(up)
        row = np.searchsorted(parent_bases, parent_base)
        orphans = (bases % up.pages != 0) | (row >= len(parent_bases))
        row = np.minimum(row, len(parent_bases) - 1)
        if len(parent_bases):
            orphans |= parent_bases[row] != parent_base
        if bool(orphans.any()):
            gfn = int(bases[np.flatnonzero(orphans)[0]])
            raise ValueError(
                f"level {level.label}: no entry of the level above points to a table at "
                f"gfn {gfn:#x}"
            )
        ids = self._pools[level].allocate(bases, np.zeros(len(bases), dtype=np.uint8))
        parent = self._pools[up].child
        assert parent is not None
        parent[parent_ids[row], (bases - parent_base) >> up.shift] = ids
        return ids

    # -- what changed --------------------------------------------------------------------

    def keep_touched(self) -> None:
        """From now on, note where leaves are installed or re-evaluated (for the oracle)."""
        self._keeping = True
        self._touched = []

    def take_touched(self) -> list[tuple[int, int]] | None:
        """The spans noted since the last call, or ``None`` if there were too many to keep
        (then the caller must look everywhere); starts a new list."""
        touched = self._touched
        self._touched = [] if self._keeping else None
        return touched

    def _note(self, start: int, end: int) -> None:
        touched = self._touched
        if touched is None:
            return
        if touched and touched[-1][0] <= end and start <= touched[-1][1]:
            touched[-1] = (min(start, touched[-1][0]), max(end, touched[-1][1]))
        elif len(touched) < TOUCHED_SPANS:
            touched.append((start, end))
        else:
            self._touched = None

    # -- one gfn ----------------------------------------------------------------------

    def lookup(self, gfn: int) -> Entry:
        """The entry a hardware walk for ``gfn`` ends at."""
        level, table = Level.ROOT, 0
        while True:
            pool = self._pools[level]
            index = (gfn >> level.shift) & 511
            if pool.child is not None:
                child = int(pool.child[table, index])
                if child >= 0:
                    level, table = Level(level - 1), child
                    continue
            byte = int(pool.ent[table, index])
            base = (gfn >> level.shift) << level.shift
            if self.marked:
                return Entry(level, base, byte, self._marked_path(gfn, level))
            return Entry(level, base, byte)

    def _marked_path(self, gfn: int, last: Level) -> bool:
        """Whether an entry on the path to ``gfn``, down to ``last``, carries a mark."""
        table = 0
        for level in (Level.ROOT, *LEAF_LEVELS_DESCENDING):
            pool = self._pools[level]
            index = (gfn >> level.shift) & 511
            if pool.ent[table, index] & RECALC:
                return True
            if level is last or pool.child is None:
                return False
            table = int(pool.child[table, index])
        return False

    def _table_for(self, gfn: int, level: Level) -> int:
        """The table at ``level`` on the path to ``gfn``, creating missing tables on the way.

        A table created under a ZAPPED entry starts with every entry ZAPPED, so refault
        tracking survives a later, smaller mapping.
        """
        table, current = 0, Level.ROOT
        while current > level:
            pool = self._pools[current]
            assert pool.child is not None
            index = (gfn >> current.shift) & 511
            child = int(pool.child[table, index])
            if child < 0:
                byte = int(pool.ent[table, index])
                assert not byte & LEAF, "the walk ran into a huge leaf that covers the gfn"
                below = Level(current - 1)
                child = int(
                    self._pools[below].allocate(
                        np.array([(gfn >> current.shift) << current.shift], dtype=np.int64),
                        np.array([byte & ZAPPED], dtype=np.uint8),
                    )[0]
                )
                pool.child[table, index] = child
                pool.ent[table, index] = 0
            table, current = child, Level(current - 1)
        return table

    def install(self, gfn: int, level: Level, byte: int) -> bool:
        """Install a leaf of ``level`` covering ``gfn`` after a fault on ``gfn``.

        A table present where the leaf goes is replaced, its subtree dropped, as KVM's TDP MMU
        does when a fault maps a huge page over a split range. Returns whether the fault was a
        refault (the faulting gfn's previous leaf was removed by a zap).
        """
        self.generation += 1
        table = self._table_for(gfn, level)
        pool = self._pools[level]
        index = (gfn >> level.shift) & 511
        refault = self.lookup(gfn).zapped
        if pool.child is not None and int(pool.child[table, index]) >= 0:
            self._release_subtree(
                Level(level - 1), np.array([pool.child[table, index]], dtype=np.int32)
            )
            pool.child[table, index] = -1
        pool.ent[table, index] = byte
        self._leaves[level] += 1
        if self._keeping:
            first = (gfn >> level.shift) << level.shift
            self._note(first, first + level.pages)
        return refault

    def mark_mmio(self, gfn: int) -> bool:
        """Leave KVM's non-present MMIO marker for an access outside every memslot, unless the
        tables it needs would take the store past :attr:`mmio_table_budget` tables made for
        markers; returns whether the marker was left."""
        missing = self._missing_tables(gfn)
        if missing and self.mmio_tables + missing > self.mmio_table_budget:
            return False
        self.mmio_tables += missing
        self.generation += 1
        table = self._table_for(gfn, Level.K4)
        self._pools[Level.K4].ent[table, gfn & 511] |= MMIO
        return True

    def _missing_tables(self, gfn: int) -> int:
        """How many tables the path to ``gfn``'s 4 KiB entry lacks."""
        table = 0
        for level in (Level.ROOT, Level.G1, Level.M2):
            child = self._pools[level].child
            assert child is not None
            table = int(child[table, (gfn >> level.shift) & 511])
            if table < 0:
                return int(level) - 1
        return 0

    def _release_subtree(self, level: Level, ids: npt.NDArray[np.int32]) -> None:
        while len(ids):
            pool = self._pools[level]
            self._leaves[level] -= int(np.count_nonzero(pool.ent[ids] >= LEAF))
            below = pool.child[ids] if pool.child is not None else None
            pool.release(ids)
            if below is None:
                return
            ids = below[below >= 0]
            level = Level(level - 1)

    # -- ranges ----------------------------------------------------------------------------

    def _rows(
        self, level: Level, tables: npt.NDArray[np.int32], start: int, end: int
    ) -> tuple[Int64Array, Int64Array, Int64Array]:
        """For each table: its base gfn and the ``[lo, hi)`` entry indices overlapping the range."""
        base = self._pools[level].base[tables]
        # np.maximum/np.minimum rather than np.clip: the walk runs per zap, mostly on a few
        # tables, where np.clip's dispatch costs more than the arithmetic.
        lo = np.minimum(np.maximum((start - base) >> level.shift, 0), ENTRIES_PER_TABLE)
        hi = np.minimum(np.maximum(((end - 1 - base) >> level.shift) + 1, 0), ENTRIES_PER_TABLE)
        return base, lo, hi

    def _walk(self, start: int, end: int, step: _LevelStep) -> None:
        """Walk the tree level by level over the tables overlapping ``[start, end)``.

        ``step`` gets one level's tables, their base gfns and the ``[lo, hi)`` entry indices
        overlapping the range, and returns the child tables to walk next. The walk stops at
        the 48-bit space.
        """
        end = min(end, EPT_GFN_LIMIT)
        if end <= start:
            return
        tables = np.zeros(1, dtype=np.int32)
        for level in (Level.ROOT, *LEAF_LEVELS_DESCENDING):
            if not len(tables):
                return
            below: list[npt.NDArray[np.int32]] = []
            # A batch of tables at a time: the temporary arrays stay a few times one batch.
            for first in range(0, len(tables), _SCAN_TABLES):
                batch = tables[first : first + _SCAN_TABLES]
                base, lo, hi = self._rows(level, batch, start, end)
                below += step(level, batch, base, lo, hi)
            tables = np.concatenate(below) if below else np.zeros(0, dtype=np.int32)

    def zap(self, rng: GfnRange) -> ZapOutcome:
        """Remove every present leaf overlapping ``rng`` (huge leaves partly inside included).

        Visits, at each level, the entries of present tables whose span overlaps the range;
        non-present entries are visited but not descended.
        """
        outcome = ZapOutcome()

        def step(
            level: Level,
            tables: npt.NDArray[np.int32],
            base: Int64Array,
            lo: Int64Array,
            hi: Int64Array,
        ) -> list[npt.NDArray[np.int32]]:
            pool = self._pools[level]
            outcome.visited[level] += int((hi - lo).sum())
            full = (lo == 0) & (hi == ENTRIES_PER_TABLE)
            blocks: list[tuple[int | slice | npt.NDArray[np.int32], slice]] = []
            if full.all():
                blocks.append((_as_block(tables), slice(None)))
            else:
                if full.any():
                    blocks.append((_as_block(tables[full]), slice(None)))
                partial = ~full
                for table, first, last in zip(
                    tables[partial].tolist(),
                    lo[partial].tolist(),
                    hi[partial].tolist(),
                    strict=True,
                ):
                    blocks.append((table, slice(first, last)))
            below = []
            for rows, cols in blocks:
                removed, children = self._zap_entries(pool, rows, cols)
                if removed:
                    outcome.removed[level] += removed
                    self._leaves[level] -= removed
                below.append(children)
            return below

        memo = self._last_zap
        if memo is not None and memo[:3] == (self.generation, rng.start, rng.end):
            outcome.visited.update(memo[3])
            return outcome
        if rng.start <= 0 and rng.end >= EPT_GFN_LIMIT:
            self._zap_everything(outcome)
        else:
            self._walk(rng.start, rng.end, step)
        self.generation += outcome.leaves_removed > 0
        self._last_zap = (self.generation, rng.start, rng.end, dict(outcome.visited))
        return outcome

    def _zap_everything(self, outcome: ZapOutcome) -> None:
        """:meth:`zap` of the whole space, without the walk: every table is reachable from the
        root and wholly inside, so the walk would visit all entries of every table and remove
        every leaf (the levels' leaf counts say where there are any: zap-all on a CD flip
        usually finds few)."""
        for level, pool in self._pools.items():
            outcome.visited[level] += pool.live * ENTRIES_PER_TABLE
            if level is Level.ROOT or not self._leaves[level]:
                continue
            every = pool.live_ids()
            for first in range(0, len(every), _SCAN_TABLES):
                self._zap_entries(pool, every[first : first + _SCAN_TABLES], slice(None))
            outcome.removed[level] += self._leaves[level]
            self._leaves[level] = 0

    def zap_shared(self, rng: GfnRange) -> ZapOutcome:
        """Patch 12's zap under the MMU lock held for read (docs/semantics.md#patch-12).

        Every entry below the root whose whole span lies inside ``rng`` is zapped where it
        stands: a leaf is removed, a table pointer drops its whole subtree (leaves counted by
        level), without descending; both leave the entry ZAPPED. A huge leaf that straddles the
        range's edge is left in place and counted (``straddling_skipped``): it may now hold a
        stale type. Only tables straddling the range are descended.
        """
        outcome = ZapOutcome(shared=True)

        def step(
            level: Level,
            tables: npt.NDArray[np.int32],
            base: Int64Array,
            lo: Int64Array,
            hi: Int64Array,
        ) -> list[npt.NDArray[np.int32]]:
            pool = self._pools[level]
            outcome.visited[level] += int((hi - lo).sum())
            entries = pool.ent[tables]
            children = None if pool.child is None else pool.child[tables]
            starts = base[:, None] + _COLUMNS[None, :] * level.pages
            inside = (lo[:, None] <= _COLUMNS) & (hi[:, None] > _COLUMNS)
            covered = inside & (starts >= rng.start) & (starts + level.pages <= rng.end)
            if level is Level.ROOT:
                covered[:] = False  # only entries of level 1 GiB and below are zapped whole
            leaves = entries >= LEAF
            pointers = np.zeros_like(leaves) if children is None else children >= 0
            outcome.straddling_skipped += int(np.count_nonzero(inside & ~covered & leaves))
            zapped_leaves = covered & leaves
            zapped_tables = covered & pointers
            outcome.entries_zapped += int(np.count_nonzero(zapped_leaves | zapped_tables))
            removed = int(np.count_nonzero(zapped_leaves))
            if removed:
                outcome.removed[level] += removed
                self._leaves[level] -= removed
            if zapped_tables.any():
                assert children is not None
                for below, count in self._drop_subtrees(Level(level - 1), children[zapped_tables]):
                    outcome.removed[below] += count
                children[zapped_tables] = -1
            entries[zapped_leaves | zapped_tables] = ZAPPED
            pool.ent[tables] = entries
            if children is None:
                return []
            assert pool.child is not None
            pool.child[tables] = children
            return [children[inside & ~covered & (children >= 0)].astype(np.int32)]

        self._walk(rng.start, rng.end, step)
        self.generation += outcome.entries_zapped > 0  # entries zapped: the only change
        return outcome

    def _drop_subtrees(self, level: Level, ids: npt.NDArray[np.int32]) -> list[tuple[Level, int]]:
        """Release the tables ``ids`` (at ``level``) and everything below; the leaves they held,
        per level."""
        before = dict(self._leaves)
        self._release_subtree(level, ids)
        return [(lvl, before[lvl] - self._leaves[lvl]) for lvl in LEAF_LEVELS_DESCENDING]

    @staticmethod
    def _zap_entries(
        pool: _Pool, rows: int | slice | npt.NDArray[np.int32], cols: slice
    ) -> tuple[int, npt.NDArray[np.int32]]:
        fancy = isinstance(rows, np.ndarray)
        entries = pool.ent[rows, cols]
        leaves = entries >= LEAF
        removed = int(np.count_nonzero(leaves))
        if removed:
            np.copyto(entries, np.uint8(ZAPPED), where=leaves)
            if fancy:
                pool.ent[rows, cols] = entries
        if pool.child is None:
            return removed, np.zeros(0, dtype=np.int32)
        children = pool.child[rows, cols]
        return removed, children[children >= 0]

    # -- deferred re-evaluation (Xen's approach) -------------------------------------------

    def mark(self, rng: GfnRange) -> MarkOutcome:
        """Mark the present root entries overlapping ``rng`` for re-evaluation.

        Constant work whatever the guest's size: only the root table is visited. Leaves below a
        mark stay present but no access may use them before :meth:`resolve` has re-evaluated
        them, and the staleness oracle does not hold them against anyone.
        """
        end = min(rng.end, EPT_GFN_LIMIT)
        if end <= rng.start:
            return MarkOutcome()
        shift = Level.ROOT.shift
        lo, hi = rng.start >> shift, ((end - 1) >> shift) + 1
        root = self._pools[Level.ROOT]
        assert root.child is not None
        entries = root.ent[0, lo:hi]
        present = root.child[0, lo:hi] >= 0
        entries[present] |= RECALC
        marked = int(np.count_nonzero(present))
        self.generation += marked > 0
        self.marked |= marked > 0
        return MarkOutcome(hi - lo, marked)

    def resolve(self, start: int, end: int, expected: IntervalMap) -> RecalcOutcome:
        """Resolve every mark on the paths to the gfns ``[start, end)``, as accesses there
        would (Xen's ``resolve_misconfig``): a marked table pointer passes its mark to the
        present entries of its table; a marked huge leaf gets the type ``expected`` gives its
        span, or is split into marked leaves of the next level if that span is mixed; a leaf
        table holding a mark is re-evaluated whole (all its marked leaves at once).
        ``expected`` holds the leaf byte a fresh fault by the accessing vCPU would write.
        """
        outcome = RecalcOutcome()
        self.generation += 1

        def step(
            level: Level,
            tables: npt.NDArray[np.int32],
            base: Int64Array,
            lo: Int64Array,
            hi: Int64Array,
        ) -> list[npt.NDArray[np.int32]]:
            if level is Level.K4:
                self._recompute_leaf_tables(tables, base, expected, outcome)
                return []
            return [
                self._resolve_entries(
                    level, tables, base, lo, hi, expected=expected, outcome=outcome
                )
            ]

        if self.marked:
            if self._keeping:  # what changes lies in the 1 GiB regions of the paths
                region = Level.G1.pages
                self._note(start // region * region, -(-end // region) * region)
            self._walk(start, end, step)
        return outcome

    def _recompute_leaf_tables(
        self,
        tables: npt.NDArray[np.int32],
        base: Int64Array,
        expected: IntervalMap,
        outcome: RecalcOutcome,
    ) -> None:
        pool = self._pools[Level.K4]
        rows = np.flatnonzero((pool.ent[tables] & RECALC).any(axis=1))
        if not len(rows):
            return
        ids = tables[rows]
        entries = pool.ent[ids]
        leaves = (entries >= LEAF) & ((entries & RECALC) != 0)
        plain = entries & np.uint8(~RECALC & 0xFF)
        want = expected.values[expected.segment_of(base[rows][:, None] + _COLUMNS[None, :])]
        outcome.leaves += int(np.count_nonzero(leaves))
        outcome.changed += int(np.count_nonzero(leaves & (want != plain)))
        pool.ent[ids] = np.where(leaves, want, plain)

    def _resolve_entries(
        self,
        level: Level,
        tables: npt.NDArray[np.int32],
        base: Int64Array,
        lo: Int64Array,
        hi: Int64Array,
        *,
        expected: IntervalMap,
        outcome: RecalcOutcome,
    ) -> npt.NDArray[np.int32]:
        """Resolve the marked entries of a non-leaf level inside ``[lo, hi)`` of each table;
        returns the tables below those entries."""
        pool, below = self._pools[level], self._pools[Level(level - 1)]
        assert pool.child is not None
        entries, children = pool.ent[tables], pool.child[tables]
        inside = (lo[:, None] <= _COLUMNS) & (hi[:, None] > _COLUMNS)
        marked = inside & ((entries & RECALC) != 0)
        entries[marked] &= np.uint8(~RECALC & 0xFF)
        pointers = marked & (children >= 0)
        if pointers.any():
            kids = children[pointers]
            kid_entries = below.ent[kids]
            present = kid_entries >= LEAF
            if below.child is not None:
                present |= below.child[kids] >= 0
            kid_entries[present] |= RECALC
            below.ent[kids] = kid_entries
            outcome.pushdowns += len(kids)
        huge = np.nonzero(marked & (entries >= LEAF))
        if len(huge[0]):
            gfns = base[huge[0]] + huge[1].astype(np.int64) * level.pages
            uniform, want = expected.uniform(gfns, level.pages)
            old = entries[huge]
            outcome.leaves += int(np.count_nonzero(uniform))
            outcome.changed += int(np.count_nonzero(uniform & (want != old)))
            entries[huge] = np.where(uniform, want, old)
            split = (huge[0][~uniform], huge[1][~uniform])
            if len(split[0]):
                ids = below.allocate(gfns[~uniform], old[~uniform] | np.uint8(RECALC))
                children[split] = ids
                entries[split] = 0
                outcome.splits += len(ids)
                self._leaves[level] -= len(ids)
                self._leaves[Level(level - 1)] += ENTRIES_PER_TABLE * len(ids)
        pool.ent[tables] = entries
        pool.child[tables] = children
        result: npt.NDArray[np.int32] = children[inside & (children >= 0)].astype(np.int32)
        return result

    def _hidden_tables(self) -> dict[Level, npt.NDArray[np.bool_]] | None:
        """Per leaf level, per table id: whether a mark above the table covers all of it."""
        if not self.marked:
            return None
        covered = {Level.ROOT: np.zeros(1, dtype=bool)}
        for level in (Level.ROOT, Level.G1, Level.M2):
            pool, below = self._pools[level], self._pools[Level(level - 1)]
            assert pool.child is not None
            hidden = np.zeros(len(below.base), dtype=bool)
            ids = pool.live_ids()
            if len(ids):
                marked = ((pool.ent[ids] & RECALC) != 0) | covered[level][ids][:, None]
                kids = pool.child[ids]
                hidden[kids[marked & (kids >= 0)]] = True
            covered[Level(level - 1)] = hidden
        return covered

    def populate(self, start: int, end: int, plan: PopulatePlan) -> PopulateOutcome:
        """Fault every gfn of ``[start, end)`` in ascending order, as a guest touching each.

        An entry already under a present leaf is a hit; otherwise a leaf of the level the plan
        allows is installed (one fault) and later gfns under it hit. Entries the plan marks
        :data:`SKIP` are left alone. Walked in at most 64 aligned pieces of at least 1 GiB,
        in order: nothing changes but the temporary arrays, bounded by one piece's entries
        (a 64th of the range), while a huge range of mostly unmapped space stays a few walks.
        """
        outcome = PopulateOutcome()
        self.generation += 1
        if self._keeping:
            self._note(start, end)
        pieces = -(-(end - start) // _POPULATE_PIECES)
        region = -(-pieces // Level.G1.pages) * Level.G1.pages
        first = start
        while first < end:
            last = min(end, (first // region + 1) * region)
            self._populate_region(first, last, plan, outcome)
            first = last
        return outcome

    def _populate_region(
        self, start: int, end: int, plan: PopulatePlan, outcome: PopulateOutcome
    ) -> None:
        bounds = (start, end)

        def step(
            level: Level,
            tables: npt.NDArray[np.int32],
            base: Int64Array,
            lo: Int64Array,
            hi: Int64Array,
        ) -> list[npt.NDArray[np.int32]]:
            full = (lo == 0) & (hi == ENTRIES_PER_TABLE)
            table_pages = level.pages * ENTRIES_PER_TABLE
            first = np.searchsorted(plan.partition, base, side="right")
            last = np.searchsorted(plan.partition, base + (table_pages - 1), side="right")
            uniform = full & (first == last)
            below: list[npt.NDArray[np.int32]] = []
            if uniform.any():
                # Tables inside one segment of the plan: one answer per table.
                codes, values = plan.classify(level, base[uniform])
                block = _Block(
                    level, _as_block(tables[uniform]), slice(None), base[uniform][:, None]
                )
                below.append(
                    self._populate_entries(block, codes[:, None], values[:, None], bounds, outcome)
                )
            for table, table_base, a, b in zip(
                tables[~uniform], base[~uniform], lo[~uniform], hi[~uniform], strict=True
            ):
                first_gfn = int(table_base) + int(a) * level.pages
                starts = first_gfn + _COLUMNS[: int(b - a)] * level.pages
                codes, values = plan.classify(level, starts)
                block = _Block(level, int(table), slice(int(a), int(b)), np.array([[first_gfn]]))
                below.append(
                    self._populate_entries(block, codes[None, :], values[None, :], bounds, outcome)
                )
            return below

        self._walk(start, end, step)

    def _populate_entries(
        self,
        block: _Block,
        codes: UInt8Array,
        values: UInt8Array,
        bounds: tuple[int, int],
        outcome: PopulateOutcome,
    ) -> npt.NDArray[np.int32]:
        """Install, replace or descend for one block of entries; returns the tables below.

        ``codes`` and ``values`` broadcast against the block (per row or per entry).
        """
        level, rows, cols = block.level, block.rows, block.cols
        pool = self._pools[level]
        fancy = isinstance(rows, np.ndarray)
        entries = np.atleast_2d(pool.ent[rows, cols])
        children = None if pool.child is None else np.atleast_2d(pool.child[rows, cols])
        missing = entries < LEAF
        here = missing & (codes == MAP_HERE)
        install = here if children is None else here & (children < 0)
        count = int(np.count_nonzero(install))
        if count:
            outcome.refaults += int(np.count_nonzero(install & ((entries & ZAPPED) != 0)))
            np.copyto(entries, np.broadcast_to(values, entries.shape), where=install)
            outcome.installed[level] += count
            self._leaves[level] += count
        if fancy:
            pool.ent[rows, cols] = entries
        if children is None:
            return np.zeros(0, dtype=np.int32)
        assert pool.child is not None
        descend = missing & (codes == DESCEND)
        new = descend & (children < 0)
        starts = block.first_gfns + _COLUMNS[: entries.shape[1]] * level.pages
        if new.any():
            ids = self._pools[Level(level - 1)].allocate(
                np.broadcast_to(starts, entries.shape)[new], entries[new] & ZAPPED
            )
            children[new] = ids
            entries[new] = 0
            if fancy:
                pool.child[rows, cols] = children
                pool.ent[rows, cols] = entries
        below: npt.NDArray[np.int32] = children[descend].astype(np.int32)
        replace = here & (children >= 0)
        if replace.any():
            regions = np.broadcast_to(starts, entries.shape)[replace]
            bytes_ = np.broadcast_to(values, entries.shape)[replace]
            start, end = bounds
            for region, byte in zip(regions.tolist(), bytes_.tolist(), strict=True):
                lo, hi = max(start, region), min(end, region + level.pages)
                self._map_over_table(level, byte, lo, hi, outcome)
        return below

    def _map_over_table(
        self, level: Level, byte: int, lo: int, hi: int, outcome: PopulateOutcome
    ) -> None:
        """A huge mapping is now allowed where a table is present: the first access in
        ``[lo, hi)`` that its leaves do not cover faults and maps the huge leaf over the table."""
        gfn = lo
        while gfn < hi:
            entry = self.lookup(gfn)
            if not entry.present:
                if self.install(gfn, level, byte):
                    outcome.refaults += 1
                outcome.installed[level] += 1
                return
            gfn = entry.base_gfn + entry.level.pages

    # -- whole store ---------------------------------------------------------------------

    def leaf_runs(self) -> Iterator[tuple[Level, int, int, int]]:
        """Present leaves in ascending gfn order, grouped into runs: ``(level, first base gfn,
        leaves, byte)`` for consecutive, contiguous leaves of one level and byte. Built one
        1 GiB region at a time (:meth:`region_leaves`), so what it holds at once is bounded
        by one region's leaves, whatever the size of the EPT."""
        return merge_runs(self.region_leaves(region) for region in self.leaf_regions())

    def leaf_regions(self) -> list[tuple[int, int, int]]:
        """The 1 GiB regions holding leaves or tables, ascending: ``(level-3 table, index,
        first gfn)``."""
        root, pool = self._pools[Level.ROOT], self._pools[Level.G1]
        assert root.child is not None and pool.child is not None
        regions: list[tuple[int, int, int]] = []
        for table in root.child[0][root.child[0] >= 0].tolist():
            present = (pool.ent[table] >= LEAF) | (pool.child[table] >= 0)
            first = int(pool.base[table])
            regions.extend(
                (table, int(i), first + int(i) * Level.G1.pages) for i in np.flatnonzero(present)
            )
        return sorted(regions, key=lambda region: region[2])

    def region_leaves(
        self, region: tuple[int, int, int]
    ) -> tuple[Int64Array, Int64Array, Int64Array]:
        """``(levels, base gfns, bytes)`` of the present leaves in one region of
        :meth:`leaf_regions`, ascending gfn (empty if the region has gone since)."""
        table, index, first = region
        g1, m2, k4 = self._pools[Level.G1], self._pools[Level.M2], self._pools[Level.K4]
        assert g1.child is not None and m2.child is not None
        empty = np.zeros(0, dtype=np.int64)
        if int(g1.base[table]) + index * Level.G1.pages != first:
            return empty, empty, empty  # its table was freed (and perhaps reused) since
        byte = int(g1.ent[table, index])
        if byte >= LEAF:
            one = np.ones(1, dtype=np.int64)
            return one * int(Level.G1), one * first, one * byte
        below = int(g1.child[table, index])
        if below < 0:
            return empty, empty, empty
        entries = m2.ent[below]
        huge = np.flatnonzero(entries >= LEAF)
        tables = m2.child[below]
        present = np.flatnonzero(tables >= 0)
        rows = k4.ent[tables[present]]
        r, c = np.nonzero(rows >= LEAF)
        gfns = np.concatenate(
            [first + huge * Level.M2.pages, first + present[r] * Level.M2.pages + c]
        ).astype(np.int64)
        levels = np.concatenate(
            [np.full(len(huge), int(Level.M2)), np.full(len(r), int(Level.K4))]
        ).astype(np.int64)
        values = np.concatenate([entries[huge], rows[r, c]]).astype(np.int64)
        order = np.argsort(gfns, kind="stable")
        return levels[order], gfns[order], values[order]

    def mismatches(
        self, expected: IntervalMap, within: tuple[Int64Array, Int64Array] | None = None
    ) -> Iterator[tuple[Level, Int64Array, UInt8Array, npt.NDArray[np.bool_], UInt8Array]]:
        """Leaves disagreeing with ``expected`` (the byte a fresh fault would write per gfn).

        Per leaf level: base gfns, bytes, whether the expected byte is uniform over the leaf,
        and the expected byte at its first page. A table whose whole span lies in one segment
        of ``expected`` is compared in one pass (the common case), so the cost is a few passes
        over the entry bytes. With ``within`` (sorted, disjoint ``(starts, ends)`` gfn ranges)
        only the tables overlapping those ranges are looked at: every leaf overlapping them is
        reported if it disagrees, and some others may be. Leaves awaiting re-evaluation (marked,
        or under a mark) are never reported: nothing can use them before they are re-evaluated.
        """
        hidden = self._hidden_tables()
        for level in LEAF_LEVELS_DESCENDING:
            if not self._leaves[level]:
                continue  # only zapped entries, markers or pointers: nothing to disagree
            pool = self._pools[level]
            every = pool.live_ids()
            span = level.pages * ENTRIES_PER_TABLE
            if within is not None and len(every):
                every = every[_overlapping(pool.base[every], span, within)]
            # A batch of tables at a time: the temporary arrays stay a few times one batch.
            for first in range(0, len(every), _SCAN_TABLES):
                ids = every[first : first + _SCAN_TABLES]
                yield from self._table_mismatches(level, ids, expected, hidden)

    def _table_mismatches(
        self,
        level: Level,
        ids: npt.NDArray[np.int32],
        expected: IntervalMap,
        hidden: dict[Level, npt.NDArray[np.bool_]] | None,
    ) -> Iterator[tuple[Level, Int64Array, UInt8Array, npt.NDArray[np.bool_], UInt8Array]]:
        """:meth:`mismatches` among the tables ``ids`` of ``level``."""
        pool = self._pools[level]
        span = level.pages * ENTRIES_PER_TABLE
        base = pool.base[ids]
        same, row_value = expected.uniform(base, span)
        entries = pool.ent[ids]
        leaves = entries >= LEAF
        if hidden is not None:
            leaves &= ((entries & RECALC) == 0) & ~hidden[level][ids][:, None]
        wrong = leaves & (entries != row_value[:, None]) & same[:, None]
        rows, cols = np.nonzero(wrong)
        parts = [(rows, cols, np.ones(len(rows), dtype=bool), row_value[rows])]
        mixed_rows = np.flatnonzero(~same)
        if len(mixed_rows):
            sub = leaves[mixed_rows]
            r, c = np.nonzero(sub)
            gfns = base[mixed_rows][r] + c.astype(np.int64) * level.pages
            uniform, want = expected.uniform(gfns, level.pages)
            bad = ~uniform | (want != entries[mixed_rows][r, c])
            parts.append((mixed_rows[r[bad]], c[bad], uniform[bad], want[bad]))
        rows = np.concatenate([p[0] for p in parts])
        if not len(rows):
            return
        cols = np.concatenate([p[1] for p in parts])
        yield (
            level,
            base[rows] + cols.astype(np.int64) * level.pages,
            entries[rows, cols],
            np.concatenate([p[2] for p in parts]),
            np.concatenate([p[3] for p in parts]).astype(np.uint8),
        )

    def leaves(self) -> Iterator[tuple[Level, Int64Array, UInt8Array]]:
        """Per leaf level: base gfns and bytes of every present leaf (unordered)."""
        for level in LEAF_LEVELS_DESCENDING:
            pool = self._pools[level]
            ids = pool.live_ids()
            if not len(ids):
                continue
            entries = pool.ent[ids]
            rows, cols = np.nonzero(entries >= LEAF)
            yield (
                level,
                pool.base[ids][rows] + cols.astype(np.int64) * level.pages,
                entries[rows, cols],
            )
