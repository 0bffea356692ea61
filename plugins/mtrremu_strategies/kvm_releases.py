"""Strategies that reproduce released kernels (docs/semantics.md#events-and-zaps)."""

from __future__ import annotations

from collections.abc import Iterable

from mtrremu.plugin import (
    NO_ZAP,
    ZAP_ALL,
    Gap,
    Profile,
    StrategySpec,
    VcpuView,
    VmView,
    ZapDecision,
    hookimpl,
    kvm_mtrr_write_range,
)

#: What released KVM leaves stale for a vCPU after its own event: no zap on a CD toggle with
#: the quirk on (the flaws the series fixes), and a moved variable range zapped at its new span.
RELEASED_GAPS = frozenset({Gap.CD_TOGGLE, Gap.MOVED_RANGE})


class ReleasedKvm:
    """KVM before the series' patch 6 (6.5-era code plus patches 1-5; 6.7 as released).

    An MTRR write zaps what ``update_mtrr`` computes, whatever CR0.CD is; a CD toggle zaps
    everything only when KVM_X86_QUIRK_CD_NW_CLEARED is off. All zaps are direct.
    """

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        rng = kvm_mtrr_write_range(vcpu, msr)
        return NO_ZAP if rng is None else ZapDecision(zap_event=True, ranges=(rng,))

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        if vm.config.quirk_cd_nw_cleared:
            return NO_ZAP
        return ZapDecision(zap_event=True, ranges=(ZAP_ALL,))

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return ZapDecision(ranges=(ZAP_ALL,))


class NoMtrrVirtualisation:
    """KVM 6.11 and later: guest MTRRs and CR0.CD never decide memory types.

    The VM never consults this strategy for MTRR or CD events (its profile does not honour
    guest MTRRs); only non-coherent DMA 0↔1 zaps everything (the IPAT bit flips).
    """

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return NO_ZAP

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return NO_ZAP

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return ZapDecision(ranges=(ZAP_ALL,))


@hookimpl
def mtrremu_strategies() -> Iterable[StrategySpec]:
    return (
        StrategySpec(
            "kvm-6.5",
            "The series' Base1: 6.5-era rules plus patches 1-5 (DMA 0<->1 zaps all). MTRR "
            "writes zap directly whatever CR0.CD is; CD toggles zap all only with the quirk "
            "off; CD=1 faults are WB+IPAT.",
            Profile.KVM_6_5,
            lambda options: ReleasedKvm(),
            known_gaps=RELEASED_GAPS,
        ),
        StrategySpec(
            "kvm-6.7",
            "KVM 6.7 as released (patches 1-5 and 7): as kvm-6.5, but CD=1 faults are WB "
            "without IPAT under the quirk, and CD toggles still do not zap with the quirk on.",
            Profile.KVM_6_7,
            lambda options: ReleasedKvm(),
            known_gaps=RELEASED_GAPS,
        ),
        StrategySpec(
            "kvm-6.11",
            "KVM 6.11 and later: guest MTRRs are not virtualised for memory types (WB, or "
            "WB+IPAT without non-coherent DMA); only DMA 0<->1 zaps.",
            Profile.KVM_6_11,
            lambda options: NoMtrrVirtualisation(),
        ),
    )
