"""CR0: the bits that matter here and KVM's rules for each way it changes
(docs/semantics.md#msrs-validity-and-cr0)."""

from __future__ import annotations

PE = 1 << 0
MP = 1 << 1
EM = 1 << 2
TS = 1 << 3
ET = 1 << 4
NE = 1 << 5
WP = 1 << 16
AM = 1 << 18
NW = 1 << 29
CD = 1 << 30
PG = 1 << 31

#: Power-on / RESET value: ET, CD and NW set.
RESET_VALUE = 0x60000010
#: Bits of the low half KVM keeps; the other low bits are silently cleared on a guest write.
_DEFINED = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG


def rejection(value: int) -> str | None:
    """Why KVM refuses this CR0 value (guest: #GP; host: KVM_SET_SREGS fails), else ``None``.

    Long-mode and PCIDE checks are not modelled.
    """
    if value >> 32:
        return "bits 63:32 set"
    if value & NW and not value & CD:
        return "NW=1 with CD=0"
    if value & PG and not value & PE:
        return "PG=1 with PE=0"
    return None


def guest_value(value: int) -> int:
    """What a guest MOV to CR0 actually stores: ET forced on, undefined low bits dropped."""
    return (value | ET) & _DEFINED


def init_value(old: int) -> int:
    """CR0 after INIT: the reset value, but CD and NW kept as they were."""
    return ET | (old & (CD | NW))
