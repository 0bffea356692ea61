"""Experimental strategies of our own (docs/semantics.md#the-experimental-strategies), built on
the public plugin API only. Both use the 6.7 memory-type profile, like the series, so they
compare with it on equal terms, and neither declares a gap: the oracle holds them to every
event, host CR0 writes and RESET included.

=============  ================================================================================
``precise``    zap exactly the gfn ranges whose memory type or IPAT an event changes for the
               vCPU it happened on (all vCPUs' views for a DMA transition), through the zap list
``lazy``       zap nothing: mark the root entries for re-evaluation; an access through a mark
               re-evaluates types on its path with the accessing vCPU's view (Xen's approach)
=============  ================================================================================

**Other vCPUs' views.** The EPT is shared while vCPUs may disagree (during boot each vCPU
programs its own MTRRs). Both strategies keep one invariant instead: *every leaf a guest can
use has the type the current view of some vCPU gives it* — the vCPU that installed (or last
re-evaluated) it — because every change of that vCPU's view removes or marks the leaves it
changes. So while vCPUs disagree, a leaf may be wrong for the others (as in KVM), and as soon as
they agree nothing is stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mtrremu.plugin import (
    NO_ZAP,
    ZAP_ALL,
    GfnRange,
    IntervalMap,
    InvalidArgument,
    Profile,
    Route,
    StrategySpec,
    VcpuView,
    VmView,
    ZapDecision,
    changed_ranges,
    hookimpl,
    memtype_map,
    merge_ranges,
)


def event_changes(vm: VmView, vcpu: VcpuView, before: IntervalMap) -> tuple[GfnRange, ...]:
    """Where ``vcpu``'s memory types now differ from ``before``."""
    return changed_ranges(before, memtype_map(vm, vcpu))


def write_changes(vm: VmView, vcpu: VcpuView) -> tuple[GfnRange, ...]:
    """Where the MTRR write being handled changed ``vcpu``'s types. With CR0.CD=1 a fault's
    type does not depend on the MTRRs (every profile): nothing, without building maps; the
    CD=1 -> 0 toggle will compare the two maps."""
    if vcpu.cd:
        return ()
    return event_changes(vm, vcpu, memtype_map(vm, vcpu, mtrr=vcpu.mtrr.before_write()))


def cd_changes(vm: VmView, vcpu: VcpuView) -> tuple[GfnRange, ...]:
    """Where the CR0.CD flip that just happened changed ``vcpu``'s types."""
    return event_changes(vm, vcpu, memtype_map(vm, vcpu, cd=not vcpu.cd))


def dma_changes(vm: VmView, attached: bool) -> tuple[GfnRange, ...]:
    """Where a DMA transition changed the types of any vCPU (one map per distinct view)."""
    views = {(v.cd, v.mtrr.snapshot()): v for v in vm.vcpus}
    spans = [
        (rng.start, rng.end)
        for v in views.values()
        for rng in event_changes(vm, v, memtype_map(vm, v, noncoherent_dma=not attached))
    ]
    return merge_ranges(spans)


class Precise:
    """Zap exactly what an event changed for the vCPU it happened on.

    Ranges go through the zap list, so vCPUs making the same change in one burst (CD toggles
    on every vCPU) zap it once. DMA transitions zap directly, as the series does.
    """

    @staticmethod
    def _zap(ranges: tuple[GfnRange, ...]) -> ZapDecision:
        if not ranges:
            return NO_ZAP
        return ZapDecision(zap_event=True, ranges=ranges, route=Route.LIST)

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return self._zap(write_changes(vm, vcpu))

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self._zap(cd_changes(vm, vcpu))

    def on_host_cd_change(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self.on_cd_toggle(vm, vcpu)

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        ranges = dma_changes(vm, attached)
        return ZapDecision(ranges=ranges) if ranges else NO_ZAP


class Lazy:
    """Mark for re-evaluation instead of zapping (Xen's ``memory_type_changed``).

    ``scope="all"`` marks every root entry at each event (constant work, as Xen does);
    ``scope="changed"`` marks only the root entries overlapping the ranges the event changed
    (none if it changed nothing).
    """

    def __init__(self, scope: str) -> None:
        self.changed_only = scope == "changed"

    def _mark(self, changed: tuple[GfnRange, ...] | None) -> ZapDecision:
        """Mark where ``changed`` says, or everywhere (None: ``scope=all``)."""
        if changed is None:
            changed = (ZAP_ALL,)
        if not changed:
            return NO_ZAP
        return ZapDecision(zap_event=True, ranges=changed, route=Route.MARK)

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return self._mark(write_changes(vm, vcpu) if self.changed_only else None)

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self._mark(cd_changes(vm, vcpu) if self.changed_only else None)

    def on_host_cd_change(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self.on_cd_toggle(vm, vcpu)

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return self._mark(dma_changes(vm, attached) if self.changed_only else None)


def _lazy(options: Mapping[str, str]) -> Lazy:
    scope = options.get("scope", "all")
    if scope not in ("all", "changed"):
        raise InvalidArgument(f"lazy: option scope={scope!r}: expected 'all' or 'changed'")
    return Lazy(scope)


@hookimpl
def mtrremu_strategies() -> Iterable[StrategySpec]:
    return (
        StrategySpec(
            "precise",
            "Experimental: zap exactly the gfn ranges whose type or IPAT the event changed for "
            "its vCPU (every view for DMA), through the zap list; no gaps.",
            Profile.KVM_6_7,
            lambda options: Precise(),
        ),
        StrategySpec(
            "lazy",
            "Experimental (Xen's approach): zap nothing; mark root entries for re-evaluation "
            "and re-evaluate types on the next access through them; no gaps.",
            Profile.KVM_6_7,
            _lazy,
            options={
                "scope": "'all' (default): mark every root entry at each event; 'changed': "
                "only those overlapping the ranges whose types changed",
            },
        ),
    )
