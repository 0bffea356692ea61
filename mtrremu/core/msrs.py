"""The MTRR and PAT MSRs: their indices, names, the fixed-range layout and the validity rules.

A rule returns the reason a write is rejected (or ``None``); the caller decides whether that is
a guest #GP (a guest WRMSR) or a request error (a host-initiated write), as KVM does.
"""

from __future__ import annotations

from collections.abc import Callable

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


def fixed_msr_slot(msr: int) -> int:
    """Position of a fixed MSR in :data:`FIXED_MSRS` (its bytes are ranges 8*slot .. 8*slot+7)."""
    return FIXED_MSRS.index(msr)


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


def _bad_type_byte(value: int, legal: Callable[[int], bool], what: str) -> str | None:
    for k in range(8):
        byte = (value >> (8 * k)) & 0xFF
        if not legal(byte):
            return f"byte {k} holds {type_label(byte)}, not a legal {what} type"
    return None


def write_rejection(msr: int, value: int, maxphyaddr: int) -> str | None:
    """Why KVM refuses writing ``value`` to ``msr``, or ``None`` if the write is accepted.

    The rules are KVM's ``kvm_mtrr_valid`` plus the read-only MTRRcap and unknown indices.
    ``value`` must already be a u64.
    """
    if msr not in EMULATED_MSRS:
        return f"{msr_name(msr)} is not an emulated MSR"
    if msr == MTRRCAP:
        return "MTRRcap is read-only"
    if msr == PAT:
        return _bad_type_byte(value, is_pat_type, "PAT")
    if msr == DEFTYPE:
        if value & ~(DEFTYPE_TYPE_MASK | DEFTYPE_FE | DEFTYPE_E):
            return "reserved bits (8-9, 12-63) set"
        if not is_mtrr_type(value & DEFTYPE_TYPE_MASK):
            return f"default {type_label(value & 0xFF)} is not a legal MTRR type"
        return None
    if is_fixed_msr(msr):
        return _bad_type_byte(value, is_mtrr_type, "MTRR")
    _, is_mask = var_pair(msr)
    high = reserved_gpa_bits(maxphyaddr)
    if is_mask:
        if value & 0x7FF:
            return "reserved bits 0-10 set"
        if value & high:
            return f"bits at or above MAXPHYADDR ({maxphyaddr}) set"
        return None
    if not is_mtrr_type(value & 0xFF):
        return f"{type_label(value & 0xFF)} is not a legal MTRR type"
    if value & 0xF00:
        return "reserved bits 8-11 set"
    if value & high:
        return f"bits at or above MAXPHYADDR ({maxphyaddr}) set"
    return None


def read_rejection(msr: int) -> str | None:
    """Why reading ``msr`` fails, or ``None`` if it is readable."""
    if msr not in EMULATED_MSRS:
        return f"{msr_name(msr)} is not an emulated MSR"
    return None
