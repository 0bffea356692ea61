"""x86 memory types and which of them each register accepts (SDM vol. 3, MTRRs and PAT)."""

from __future__ import annotations

import enum


class MemType(enum.IntEnum):
    """A memory type encoding as used by MTRRs, PAT and EPT entries (bits 5:3)."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6
    UC_MINUS = 7  # PAT only ("UC-")

    @property
    def label(self) -> str:
        return "UC-" if self is MemType.UC_MINUS else self.name


_MTRR_TYPES = frozenset({0, 1, 4, 5, 6})
_PAT_TYPES = _MTRR_TYPES | {7}


def is_mtrr_type(value: int) -> bool:
    """True if ``value`` is a type an MTRR may hold: UC, WC, WT, WP or WB."""
    return value in _MTRR_TYPES


def is_pat_type(value: int) -> bool:
    """True if ``value`` is a type a PAT entry may hold: the MTRR types plus UC-."""
    return value in _PAT_TYPES


def type_label(value: int) -> str:
    """A readable name for a type byte, legal or not."""
    try:
        return MemType(value).label
    except ValueError:
        return f"type {value}"
