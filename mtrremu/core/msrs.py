"""The MTRR and PAT MSRs: their indices, names, the fixed-range layout and the validity rules.

A rule returns the reason a write is rejected (or ``None``); the caller decides whether that is
a guest #GP (a guest WRMSR) or a request error (a host-initiated write), as KVM does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

from mtrremu.core.memtypes import is_mtrr_type, is_pat_type, type_label
from mtrremu.core.units import PAGE_SHIFT

MTRRCAP = 0xFE
PHYSBASE0 = 0x200
VAR_PAIRS = 8
PHYSMASK_LAST = PHYSBASE0 + 2 * VAR_PAIRS - 1
FIX64K_00000 = 0x250
FIX16K_80000 = 0x258
FIX16K_A0000 = 0x259
FIX4K_C0000 = 0x268
FIX4K_F8000 = 0x26F
PAT = 0x277
DEFTYPE = 0x2FF

#: What MTRRcap reads: 8 variable pairs, fixed ranges supported (bit 8), WC supported (bit 10).
MTRRCAP_VALUE = 0x500 | VAR_PAIRS

#: Power-on PAT (SDM): WB, WT, UC-, UC repeated.
PAT_DEFAULT = 0x0007040600070406

DEFTYPE_TYPE_MASK = 0xFF
DEFTYPE_FE = 1 << 10
DEFTYPE_E = 1 << 11
PHYSMASK_VALID = 1 << 11

FIXED_MSRS: tuple[int, ...] = (
    FIX64K_00000,
    FIX16K_80000,
    FIX16K_A0000,
    *range(FIX4K_C0000, FIX4K_F8000 + 1),
)
VAR_MSRS: tuple[int, ...] = tuple(range(PHYSBASE0, PHYSMASK_LAST + 1))
#: Every MSR the emulator knows, in the order QEMU pushes them (defType first).
MTRR_MSRS: tuple[int, ...] = (DEFTYPE, *FIXED_MSRS, *VAR_MSRS)
EMULATED_MSRS: frozenset[int] = frozenset({MTRRCAP, PAT, *MTRR_MSRS})

# Fixed-range layout: (first MSR, bytes per range) for each MSR; 8 ranges per MSR, 88 in all.
_FIXED_RANGE_BYTES = {FIX64K_00000: 0x10000, FIX16K_80000: 0x4000, FIX16K_A0000: 0x4000}
_FIXED_MSR_START = {FIX64K_00000: 0x0, FIX16K_80000: 0x80000, FIX16K_A0000: 0xA0000}
for _i, _msr in enumerate(range(FIX4K_C0000, FIX4K_F8000 + 1)):
    _FIXED_RANGE_BYTES[_msr] = 0x1000
    _FIXED_MSR_START[_msr] = 0xC0000 + _i * 0x8000

FIXED_RANGES = 8 * len(FIXED_MSRS)
FIXED_AREA_END_GPA = 0x100000


_FIXED_SLOTS = {msr: slot for slot, msr in enumerate(FIXED_MSRS)}


def fixed_msr_slot(msr: int) -> int:
    """Position of a fixed MSR in :data:`FIXED_MSRS` (its bytes are ranges 8*slot .. 8*slot+7)."""
    return _FIXED_SLOTS[msr]


def fixed_msr_gpa_span(msr: int) -> tuple[int, int]:
    """The ``[start, end)`` guest-physical span a fixed MSR's 8 ranges cover."""
    start = _FIXED_MSR_START[msr]
    return start, start + 8 * _FIXED_RANGE_BYTES[msr]


def _fixed_range_gfn_bounds() -> tuple[tuple[int, int], ...]:
    bounds = []
    for msr in FIXED_MSRS:
        start, size = _FIXED_MSR_START[msr], _FIXED_RANGE_BYTES[msr]
        for k in range(8):
            lo = start + k * size
            bounds.append((lo >> PAGE_SHIFT, (lo + size) >> PAGE_SHIFT))
    return tuple(bounds)


#: ``[start, end)`` in gfns of each of the 88 fixed ranges, in MSR byte order.
FIXED_RANGE_GFNS: tuple[tuple[int, int], ...] = _fixed_range_gfn_bounds()


def is_var_msr(msr: int) -> bool:
    return PHYSBASE0 <= msr <= PHYSMASK_LAST


def is_fixed_msr(msr: int) -> bool:
    return msr in _FIXED_MSR_START


def is_mtrr_msr(msr: int) -> bool:
    """A range or default-type MTRR MSR: the ones whose writes may change memory types."""
    return msr == DEFTYPE or is_fixed_msr(msr) or is_var_msr(msr)


def var_pair(msr: int) -> tuple[int, bool]:
    """``(pair index, is_mask)`` of a variable-range MSR."""
    offset = msr - PHYSBASE0
    return offset // 2, bool(offset & 1)


def msr_name(msr: int) -> str:
    """The SDM name of an MSR index, or its hex value when it is not one we emulate."""
    if msr == MTRRCAP:
        return "MTRRcap"
    if msr == DEFTYPE:
        return "MTRRdefType"
    if msr == PAT:
        return "PAT"
    if is_var_msr(msr):
        pair, is_mask = var_pair(msr)
        return f"MTRRphys{'Mask' if is_mask else 'Base'}{pair}"
    if is_fixed_msr(msr):
        start, _ = fixed_msr_gpa_span(msr)
        kind = {FIX64K_00000: "64K", FIX16K_80000: "16K", FIX16K_A0000: "16K"}.get(msr, "4K")
        return f"MTRRfix{kind}_{start:05X}"
    return f"MSR {msr:#x}"


def reserved_gpa_bits(maxphyaddr: int) -> int:
    """Bits 63..MAXPHYADDR: what KVM calls the vCPU's reserved gpa bits."""
    return ((1 << 64) - 1) ^ ((1 << maxphyaddr) - 1)


_MTRR_TYPE_BYTES = bytes(t for t in range(256) if is_mtrr_type(t))
_PAT_TYPE_BYTES = bytes(t for t in range(256) if is_pat_type(t))
_MTRR_TYPE_SET = frozenset(_MTRR_TYPE_BYTES)


def _bad_type_byte(value: int, legal: bytes, what: str) -> str | None:
    # Fast path: delete every legal byte; nothing left means all eight are legal.
    raw = value.to_bytes(8, "little")
    if not raw.translate(None, legal):
        return None
    k = next(k for k, byte in enumerate(raw) if byte not in legal)
    return f"byte {k} holds {type_label(raw[k])}, not a legal {what} type"


def not_emulated(msr: int) -> str:
    """Why a write to an MSR without a check (:attr:`WriteRules.checks`) is refused."""
    return f"{msr_name(msr)} is not an emulated MSR"


class WriteRules:
    """KVM's ``kvm_mtrr_valid`` for one guest MAXPHYADDR, plus read-only MTRRcap and unknown
    indices: one check per MSR, found by index."""

    def __init__(self, maxphyaddr: int) -> None:
        self.maxphyaddr = maxphyaddr
        self._high = reserved_gpa_bits(maxphyaddr)
        checks: dict[int, Callable[[int], str | None]] = {
            MTRRCAP: lambda value: "MTRRcap is read-only",
            PAT: lambda value: _bad_type_byte(value, _PAT_TYPE_BYTES, "PAT"),
            DEFTYPE: self._deftype,
        }
        for msr in FIXED_MSRS:
            checks[msr] = self._fixed
        for msr in range(PHYSBASE0, PHYSMASK_LAST + 1, 2):
            checks[msr] = self._base
            checks[msr + 1] = self._mask
        #: Per emulated MSR: why a value cannot be written to it, or ``None``.
        self.checks: Mapping[int, Callable[[int], str | None]] = checks

    def rejection(self, msr: int, value: int) -> str | None:
        """Why ``value`` (a u64) cannot be written to ``msr``, or ``None``."""
        check = self.checks.get(msr)
        return not_emulated(msr) if check is None else check(value)

    @staticmethod
    def _deftype(value: int) -> str | None:
        if value & ~(DEFTYPE_TYPE_MASK | DEFTYPE_FE | DEFTYPE_E):
            return "reserved bits (8-9, 12-63) set"
        if value & DEFTYPE_TYPE_MASK not in _MTRR_TYPE_SET:
            return f"default {type_label(value & 0xFF)} is not a legal MTRR type"
        return None

    @staticmethod
    def _fixed(value: int) -> str | None:
        return _bad_type_byte(value, _MTRR_TYPE_BYTES, "MTRR")

    def _base(self, value: int) -> str | None:
        if value & 0xFF not in _MTRR_TYPE_SET:
            return f"{type_label(value & 0xFF)} is not a legal MTRR type"
        if value & 0xF00:
            return "reserved bits 8-11 set"
        if value & self._high:
            return f"bits at or above MAXPHYADDR ({self.maxphyaddr}) set"
        return None

    def _mask(self, value: int) -> str | None:
        if value & 0x7FF:
            return "reserved bits 0-10 set"
        if value & self._high:
            return f"bits at or above MAXPHYADDR ({self.maxphyaddr}) set"
        return None


@lru_cache(maxsize=64)
def write_rules(maxphyaddr: int) -> WriteRules:
    """The write rules for one guest MAXPHYADDR, built once and shared by its VMs."""
    return WriteRules(maxphyaddr)


def read_rejection(msr: int) -> str | None:
    """Why reading ``msr`` fails, or ``None`` if it is readable."""
    if msr not in EMULATED_MSRS:
        return f"{msr_name(msr)} is not an emulated MSR"
    return None
