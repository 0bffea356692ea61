"""``example-changed``: zap only the gfn ranges whose memory type an event changed.

A third-party strategy shipped as its own distribution (plugins/examples/ in mtrremu's tree,
docs/plugins.md). For the vCPU an event happened on it compares what a fault would install
before and after the event (:func:`~mtrremu.plugin.memtype_map`), zaps the ranges that differ,
clipped to the VM's memslots, directly; a non-coherent DMA 0<->1 transition changes the IPAT
bit of every RAM page, so it zaps every memslot. It declares no gap: the oracle holds it to
every event.
"""

from __future__ import annotations

from collections.abc import Iterable

from mtrremu.plugin import (
    NO_ZAP,
    GfnRange,
    IntervalMap,
    Profile,
    StrategySpec,
    VcpuView,
    VmView,
    ZapDecision,
    changed_ranges,
    hookimpl,
    memtype_map,
    merge_ranges,
)

#: The hook specification version this plugin was written against.
MTRREMU_HOOKSPEC_VERSION = 1


def within_memslots(vm: VmView, ranges: Iterable[GfnRange]) -> tuple[GfnRange, ...]:
    """``ranges`` cut to the VM's memslots (nothing outside guest memory is ever mapped)."""
    slots = [slot.gfns for slot in vm.memslots]
    parts = [
        (part.start, part.end)
        for rng in ranges
        for slot in slots
        if (part := rng.intersect(slot)) is not None
    ]
    return merge_ranges(parts)


def zap(ranges: tuple[GfnRange, ...]) -> ZapDecision:
    return ZapDecision(zap_event=True, ranges=ranges) if ranges else NO_ZAP


class ChangedOnly:
    """Zaps, directly, what the event changed for its own vCPU."""

    @staticmethod
    def _changes(vm: VmView, vcpu: VcpuView, before: IntervalMap) -> ZapDecision:
        return zap(within_memslots(vm, changed_ranges(before, memtype_map(vm, vcpu))))

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        before = memtype_map(vm, vcpu, mtrr=vcpu.mtrr.before_write())
        return self._changes(vm, vcpu, before)

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self._changes(vm, vcpu, memtype_map(vm, vcpu, cd=not vcpu.cd))

    def on_host_cd_change(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self.on_cd_toggle(vm, vcpu)

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return zap(tuple(slot.gfns for slot in vm.memslots))


@hookimpl
def mtrremu_strategies() -> Iterable[StrategySpec]:
    return [
        StrategySpec(
            "example-changed",
            "Example plugin: zap, directly, only the ranges whose type the event changed for "
            "its vCPU, clipped to memslots; every memslot on DMA 0<->1; no gaps.",
            Profile.KVM_6_7,
            lambda options: ChangedOnly(),
        )
    ]
