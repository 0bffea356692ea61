"""Where the memory type of guest memory is decided.

* :func:`guest_memory_type` — §4: the MTRR type of one 4 KiB page (KVM's
  ``kvm_mtrr_get_guest_memory_type``, or the SDM's precedence on request).
* :func:`range_is_consistent` — §5: KVM's huge-page consistency test over an aligned range.
* :func:`ept_memtype` — §5: the memory type and IPAT bit a fault installs, per profile.

All three read the MTRRs through the one lookup walk of :meth:`MtrrState.lookup`, so the fault
path, the huge-page test and the staleness oracle agree by construction.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from mtrremu.core.memtypes import MemType
from mtrremu.core.mtrr_state import MtrrState

_WT_WB = frozenset({MemType.WT, MemType.WB})


class Precedence(enum.Enum):
    """How overlapping variable ranges combine."""

    #: KVM's order-dependent loop over its list (faithful).
    KVM = "kvm"
    #: The SDM's rules: identical → it; any UC → UC; only WT and WB → WT; else undefined (WB).
    SDM = "sdm"


class Profile(enum.Enum):
    """Which kernel's memory-type rules apply (docs/semantics.md#the-ept-entry-a-fault-installs)."""

    KVM_6_5 = "6.5"
    KVM_6_7 = "6.7"
    KVM_6_11 = "6.11"

    @property
    def honours_guest_mtrrs(self) -> bool:
        """Whether this kernel ever uses guest MTRRs and CR0.CD for EPT memory types."""
        return self is not Profile.KVM_6_11

    def cd_memtype(self, quirk_cd_nw_cleared: bool) -> EptMemtype:
        """What a fault by a vCPU with CR0.CD=1 gets while guest MTRRs are honoured."""
        if not quirk_cd_nw_cleared:
            return EptMemtype(MemType.UC, ipat=True)
        return EptMemtype(MemType.WB, ipat=self is Profile.KVM_6_5)


@dataclass(frozen=True)
class EptMemtype:
    """The memory type bits of an EPT leaf: type (bits 5:3) and IPAT (bit 6)."""

    type: MemType
    ipat: bool

    def __str__(self) -> str:
        return f"{self.type.label}{'+IPAT' if self.ipat else ''}"


WB_IPAT = EptMemtype(MemType.WB, ipat=True)
WB_NO_IPAT = EptMemtype(MemType.WB, ipat=False)
UC_NO_IPAT = EptMemtype(MemType.UC, ipat=False)


def disabled_type(feature_mtrr: bool) -> MemType:
    """The type of every page while MTRRs are disabled (E=0)."""
    return MemType.UC if feature_mtrr else MemType.WB


def _combine_kvm(types: tuple[int, ...]) -> int:
    current = types[0]
    for match in types[1:]:
        if match == current:
            continue
        if match == MemType.UC:
            return MemType.UC
        if current in _WT_WB and match in _WT_WB:
            current = MemType.WT
            continue
        return MemType.WB
    return current


def _combine_sdm(types: tuple[int, ...]) -> int:
    seen = set(types)
    if len(seen) == 1:
        return types[0]
    if MemType.UC in seen:
        return MemType.UC
    if seen <= _WT_WB:
        return MemType.WT
    return MemType.WB


def guest_memory_type(
    mtrr: MtrrState, gfn: int, feature_mtrr: bool, precedence: Precedence = Precedence.KVM
) -> MemType:
    """§4: the type the vCPU's MTRRs give the 4 KiB page ``gfn``."""
    seen = mtrr.lookup(gfn, gfn + 1)
    if seen.disabled:
        return disabled_type(feature_mtrr)
    if not seen.types:
        return MemType(mtrr.default_type)
    combine = _combine_kvm if precedence is Precedence.KVM else _combine_sdm
    return MemType(combine(seen.types))


def range_is_consistent(mtrr: MtrrState, start_gfn: int, pages: int) -> bool:
    """§5: KVM's ``kvm_mtrr_check_gfn_range_consistency`` over ``[start_gfn, +pages)``.

    Conservative by design: abutting ranges can read as partly covered.
    """
    seen = mtrr.lookup(start_gfn, start_gfn + pages)
    if seen.disabled:
        return True
    if any(t != seen.types[0] for t in seen.types[1:]):
        return False
    if not seen.partial or not seen.types:
        return True
    return seen.types[0] == mtrr.default_type


def ept_memtype(
    profile: Profile,
    *,
    tdp: bool,
    noncoherent_dma: bool,
    quirk_cd_nw_cleared: bool,
    cd: bool,
    device: bool,
    guest_type: Callable[[], MemType],
) -> EptMemtype:
    """§5 (KVM's ``vmx_get_mt_mask``): the memory type a fault installs.

    ``guest_type`` is only called when the MTRRs decide, so callers can pass the costly §4
    computation lazily.
    """
    if device:
        return UC_NO_IPAT
    if not tdp or not noncoherent_dma:
        return WB_IPAT
    if not profile.honours_guest_mtrrs:
        return WB_NO_IPAT
    if cd:
        return profile.cd_memtype(quirk_cd_nw_cleared)
    return EptMemtype(guest_type(), ipat=False)
