"""One vCPU's MTRR registers, stored the way KVM stores them, and KVM's walk over them.

KVM keeps the valid variable pairs in a list ordered by descending raw PhysBase value (type byte
included); a pair that becomes valid is inserted before the first entry whose raw base is less
than or equal to its own. Memory types depend on that order, so we keep it
(docs/semantics.md#the-memory-type-of-one-page).

Masks are stored as KVM 6.5 stores them: a written mask gets every bit at or above MAXPHYADDR
set, and reads strip them again. A mask never written since the vCPU was created is 0, as in
KVM; a base written under such a mask yields a wrapped (empty) range, exactly like
``var_mtrr_range`` does in 64-bit arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtrremu.core import msrs
from mtrremu.core.units import PAGE_SHIFT, U64_MASK, GfnRange

_PAGE_MASK = U64_MASK ^ ((1 << PAGE_SHIFT) - 1)


# Where each MTRR MSR is stored, found with one lookup per write: its kind (one of these four
# objects, compared by identity) and its fixed-range byte offset or variable pair index.
_DEFTYPE, _FIXED, _BASE, _MASK = "deftype", "fixed", "base", "mask"
_WHERE: dict[int, tuple[str, int]] = {
    msrs.DEFTYPE: (_DEFTYPE, 0),
    **{msr: (_FIXED, 8 * slot) for slot, msr in enumerate(msrs.FIXED_MSRS)},
    **{
        msr: (_MASK if is_mask else _BASE, pair)
        for msr in msrs.VAR_MSRS
        for pair, is_mask in [msrs.var_pair(msr)]
    },
}


@dataclass(frozen=True)
class Lookup:
    """What KVM's MTRR lookup saw over one gpa range, in the order it saw it.

    ``types`` lists the type of every matching range (fixed ranges first, then variable ranges
    in list order); ``partial`` says the variable ranges did not cover the whole range as the
    walk's forward-moving bookkeeping saw it; ``disabled`` says MTRRs are off (E=0), in which
    case nothing was walked.
    """

    types: tuple[int, ...]
    partial: bool
    disabled: bool


#: MTRR registers as stored: defType, the fixed-range bytes, the variable bases and masks.
Registers = tuple[int, bytes, tuple[int, ...], tuple[int, ...]]


@dataclass
class MtrrState:
    """The MTRR MSRs of one vCPU. Writes must have been validated (:mod:`mtrremu.core.msrs`)."""

    maxphyaddr: int
    deftype: int = 0
    fixed: bytearray = field(default_factory=lambda: bytearray(msrs.FIXED_RANGES))
    bases: list[int] = field(default_factory=lambda: [0] * msrs.VAR_PAIRS)
    masks: list[int] = field(default_factory=lambda: [0] * msrs.VAR_PAIRS)
    #: Valid pair indices in KVM's list order.
    order: list[int] = field(default_factory=list)
    #: Bumped on every write that changes a register as read back or the variable list
    #: order (what memory types depend on); caches of derived maps key on it.
    version: int = 0

    def __post_init__(self) -> None:
        self._high = msrs.reserved_gpa_bits(self.maxphyaddr)
        # What the last write replaced: (msr, stored value, variable list order or None).
        # (A fixed range's old value is kept as its 8 bytes.)
        self._undo: tuple[int, int | bytearray, list[int] | None] | None = None

    # -- registers ------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.deftype & msrs.DEFTYPE_E)

    @property
    def fixed_enabled(self) -> bool:
        return bool(self.deftype & msrs.DEFTYPE_FE)

    @property
    def default_type(self) -> int:
        return self.deftype & msrs.DEFTYPE_TYPE_MASK

    def pair_valid(self, pair: int) -> bool:
        return bool(self.masks[pair] & msrs.PHYSMASK_VALID)

    def pair_type(self, pair: int) -> int:
        return self.bases[pair] & 0xFF

    def write(self, msr: int, value: int) -> bool:
        """Store an already validated MTRR MSR value (defType, fixed or variable); whether
        the registers as read back or the variable list order changed (a rewrite of the same
        value can still reorder pairs that share a base)."""
        where = _WHERE.get(msr)
        if where is None:
            raise ValueError(f"{msrs.msr_name(msr)} is not an MTRR MSR")
        kind, at = where
        if kind is _FIXED:
            old = self.fixed[at : at + 8]
            self._undo = (msr, old, None)  # bytes: turned into a value only if asked for
            new = value.to_bytes(8, "little")
            if new == old:
                return False
            self.fixed[at : at + 8] = new
        elif kind is _DEFTYPE:
            self._undo = (msr, self.deftype, None)
            if value == self.deftype:
                return False
            self.deftype = value
        else:  # a variable pair's base or mask (``at`` is the pair)
            masks, bases = self.masks, self.bases
            was_valid = masks[at] & msrs.PHYSMASK_VALID
            if kind is _MASK:
                stored = masks[at]
                masks[at] = value | self._high
                changed = stored & ~self._high != value
            else:
                stored = bases[at]
                bases[at] = value
                changed = stored != value
            # The order list is replaced, never changed in place: the undo record keeps it.
            self._undo = (msr, stored, self.order)
            if (was_valid or masks[at] & msrs.PHYSMASK_VALID) and self._reorder(at):
                changed = True
            if not changed:
                return False
        self.version += 1
        return True

    def rewrite(self, msr: int, value: int) -> bool:
        """The fast path of a write of the value a register already holds (a VMM's full
        register push does many): if ``msr`` holds exactly ``value`` as stored and writing it
        again could not move a pair in the variable list (its pair is not valid), record it
        as the last write, which changed nothing, and return True. Else change nothing and
        return False: the caller validates ``value`` and calls :meth:`write`. (A held value
        needs no validation: it was validated when it was written, or is the reset value.)
        ``value`` must be a u64."""
        where = _WHERE.get(msr)
        if where is None:
            return False
        kind, at = where
        if kind is _FIXED:
            held = self.fixed[at : at + 8] == value.to_bytes(8, "little")
        elif kind is _DEFTYPE:
            held = self.deftype == value
        elif self.masks[at] & msrs.PHYSMASK_VALID:
            return False  # a valid pair's rewrite goes back into the list: it may move
        elif kind is _MASK:
            held = self.masks[at] == value | self._high  # (a never-written mask is 0)
        else:
            held = self.bases[at] == value
        if held:
            self._undo = None
        return held

    def before_last_write(self) -> MtrrState:
        """A copy of these registers as they were before the last accepted write (an
        unchanged copy if none was made yet), the variable list order included."""
        state = self.copy()
        if self._undo is None:
            return state
        msr, stored, order = self._undo
        if isinstance(stored, bytearray):
            slot = msrs.fixed_msr_slot(msr)
            state.fixed[8 * slot : 8 * slot + 8] = stored
        elif msr == msrs.DEFTYPE:
            state.deftype = stored
        else:
            pair, is_mask = msrs.var_pair(msr)
            if is_mask:
                state.masks[pair] = stored
            else:
                state.bases[pair] = stored
            state.order = list(order or ())
        state.version = -1
        return state

    def _reorder(self, pair: int) -> bool:
        """Put ``pair`` (valid, or valid until its last write) where KVM's list would have it
        now; whether the order changed."""
        bases, order = self.bases, self.order
        new = [other for other in order if other != pair]
        if self.masks[pair] & msrs.PHYSMASK_VALID:
            base = bases[pair]
            at = next((i for i, other in enumerate(new) if base >= bases[other]), len(new))
            new.insert(at, pair)
        self.order = new
        return new != order

    def read(self, msr: int) -> int:
        """Read an MTRR MSR back as a guest would (masks without the internal high bits)."""
        if msr == msrs.DEFTYPE:
            return self.deftype
        if msrs.is_fixed_msr(msr):
            slot = msrs.fixed_msr_slot(msr)
            return int.from_bytes(self.fixed[8 * slot : 8 * slot + 8], "little")
        if msrs.is_var_msr(msr):
            pair, is_mask = msrs.var_pair(msr)
            if is_mask:
                return self.masks[pair] & ~self._high
            return self.bases[pair]
        raise ValueError(f"{msrs.msr_name(msr)} is not an MTRR MSR")

    def registers(self) -> Registers:
        """The registers as a guest reads them back (cheap to build and compare): two vCPUs
        of a VM expect the same memory types exactly when these are equal. (A mask never
        written is stored as 0 and one written 0 with the bits above MAXPHYADDR: they read
        back alike and mean the same types, but not the same zap ranges.)"""
        masks = tuple(m & ~self._high for m in self.masks)
        return self.deftype, bytes(self.fixed), tuple(self.bases), masks

    def unset_masks(self) -> tuple[int, ...]:
        """The pairs whose PhysMask was never written since reset (stored as 0)."""
        return tuple(pair for pair, mask in enumerate(self.masks) if mask == 0)

    def snapshot(self) -> tuple[int, ...]:
        """Every MTRR MSR value as read back, in :data:`msrs.MTRR_MSRS` order."""
        return tuple(self.read(msr) for msr in msrs.MTRR_MSRS)

    def copy(self) -> MtrrState:
        return MtrrState(
            maxphyaddr=self.maxphyaddr,
            deftype=self.deftype,
            fixed=bytearray(self.fixed),
            bases=list(self.bases),
            masks=list(self.masks),
            order=list(self.order),
            version=self.version,
        )

    # -- variable range arithmetic ---------------------------------------------------------

    def var_range_gpa(self, pair: int) -> tuple[int, int]:
        """KVM's ``var_mtrr_range``: ``[start, end)`` from the stored base and mask, in u64.

        A zero written mask gives ``end = 2**MAXPHYADDR``; a base misaligned for its mask gives
        ``[start, aligned end)``; a never-written mask wraps ``end`` to 0.
        """
        start = self.bases[pair] & _PAGE_MASK
        mask = self.masks[pair] & _PAGE_MASK
        end = ((start | (~mask & U64_MASK)) + 1) & U64_MASK
        return start, end

    def var_range_gfns(self, pair: int) -> GfnRange:
        start, end = self.var_range_gpa(pair)
        return GfnRange(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def valid_ranges(self) -> list[tuple[GfnRange, int]]:
        """``(gfn range, type)`` of each valid pair, in KVM's list order."""
        return [(self.var_range_gfns(p), self.pair_type(p)) for p in self.order]

    # -- KVM's lookup walk ----------------------------------------------------------------

    def lookup(self, start_gfn: int, end_gfn: int) -> Lookup:
        """Walk the ranges matching gfns ``[start_gfn, end_gfn)`` as KVM's ``mtrr_lookup`` does.

        Fixed ranges are walked (FE=1 and the range starts below 1 MiB) from the one holding the
        start until one ends at or past the range's end; if all 88 were walked, the variable
        list follows. Only variable matches feed the coverage bookkeeping.
        """
        if not self.enabled:
            return Lookup((), partial=False, disabled=True)
        types: list[int] = []
        start, end = start_gfn << PAGE_SHIFT, end_gfn << PAGE_SHIFT
        if self.fixed_enabled and start < msrs.FIXED_AREA_END_GPA:
            index = next(i for i, (_, hi) in enumerate(msrs.FIXED_RANGE_GFNS) if hi > start_gfn)
            while True:
                types.append(self.fixed[index])
                if msrs.FIXED_RANGE_GFNS[index][1] >= end_gfn:
                    return Lookup(tuple(types), partial=False, disabled=False)
                index += 1
                if index >= msrs.FIXED_RANGES:
                    break
        partial = False
        covered_to = start
        for pair in self.order:
            lo, hi = self.var_range_gpa(pair)
            if lo >= end or hi <= start:
                continue
            types.append(self.pair_type(pair))
            partial |= covered_to < lo
            covered_to = max(covered_to, hi)
        partial |= covered_to < end
        return Lookup(tuple(types), partial=partial, disabled=False)

    def breakpoints(self) -> list[int]:
        """Gfns where the set of matching ranges may change: fixed edges and valid pair edges.

        Between two consecutive breakpoints every page sees the same matches, so memory types
        and KVM's consistency verdicts are constant there.
        """
        points = {0}
        if self.enabled:
            if self.fixed_enabled:
                points.update(lo for lo, _ in msrs.FIXED_RANGE_GFNS)
                points.add(msrs.FIXED_RANGE_GFNS[-1][1])
            for rng, _ in self.valid_ranges():
                points.add(rng.start)
                points.add(rng.end)
        return sorted(points)
