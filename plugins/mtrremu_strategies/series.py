"""The series "KVM: x86/mmu: refine memtype related mmu zap" (v4), one strategy per row of its
cover letter's table (docs/semantics.md#the-built-in-strategies). All use the 6.7 memory-type
profile (patch 7).

=====================  ===========================================================
``zap-all``            Base2 (+ patches 6-8): zap all on every CD toggle; no MTRR-write
                       zap while the writer has CD=1
``zap-all-serialized`` + patch 9: every zap goes through the serialised zap list
``fine-grained``       + patch 10: a CD toggle queues only the ranges whose type differs
                       from the default (the seed)
``fine-grained-split`` + patch 11: general-path ranges cut to their memslot parts
=====================  ===========================================================

Patch 12 (zapping under the MMU lock held for read) combines with three of them, as the cover
letter measured: ``zap-all-shared`` (Base2 + 12), ``fine-grained-shared`` (+ 9 + 10 + 12) and
``fine-grained-split-shared`` (+ 9 + 10 + 11 + 12). The decisions are the same as without it;
only how each zap holds the lock and walks the EPT changes (``StrategySpec.mmu_lock``).
"""

from __future__ import annotations

from collections.abc import Iterable

from mtrremu.plugin import (
    NO_ZAP,
    ZAP_ALL,
    AllocFailure,
    Gap,
    GfnRange,
    MmuLock,
    Profile,
    Route,
    StrategySpec,
    VcpuView,
    VmView,
    ZapDecision,
    hookimpl,
    kvm_mtrr_write_range,
)

#: The series keeps KVM's variable-range arithmetic: a range rewritten while MTRRs are enabled
#: (and the writer has CD=0) is zapped at its new span only.
SERIES_GAPS = frozenset({Gap.MOVED_RANGE})

#: Patch 12 leaves a huge leaf straddling a zapped range's edge in place.
SHARED_GAPS = SERIES_GAPS | {Gap.STRADDLING_LEAF}

#: The fixed ranges' span, queued whole when any of them is not the default type.
FIXED_AREA = GfnRange(0, 0x100000 >> 12)


class ZapAll:
    """Base2: patch 6 moves the zap to CD toggles (zap all) and skips MTRR-write zaps while the
    writing vCPU has CD=1; patches 7-8 only change what a CD=1 fault installs (the profile)."""

    route = Route.DIRECT
    split = False

    def general_zap(self, rng: GfnRange) -> ZapDecision:
        """A zap through the general MTRR path (patch 9's ``kvm_mtrr_zap_gfn_range``)."""
        return ZapDecision(
            zap_event=True, ranges=(rng,), route=self.route, split_by_memslot=self.split
        )

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        if vcpu.cd:
            return NO_ZAP
        rng = kvm_mtrr_write_range(vcpu, msr)
        return NO_ZAP if rng is None else self.general_zap(rng)

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self.general_zap(ZAP_ALL)

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        # Patch 5's zap is a plain kvm_zap_gfn_range in every row of the series.
        return ZapDecision(ranges=(ZAP_ALL,))


class ZapAllSerialized(ZapAll):
    """Patch 9: CD-toggle and MTRR-write zaps are queued on the VM-wide list; identical ranges
    queued at the same time are zapped once."""

    route = Route.LIST


class FineGrained(ZapAllSerialized):
    """Patch 10 (the seed): on a CD toggle, compare what a CD=1 fault gets with the toggling
    vCPU's default type.

    * They differ (or CD=1 sets IPAT): everything's type changes, zap all (general path).
    * MTRRs enabled: queue [0, 1 MiB) once if any fixed range differs from the default (FE is
      not looked at), and every valid variable range whose type differs; then drain or wait,
      even if nothing was queued. A failed queue allocation empties the whole list and zaps
      all directly.
    * MTRRs disabled and the types match: nothing changes, nothing to do.

    Only the toggling vCPU's MTRRs are read: entries faulted under other vCPUs' views are
    not considered (a gap the oracle shows when vCPUs disagree).
    """

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        cd = vm.cd_memtype()
        default = vm.effective_default_type(vcpu)
        if cd.type != default or cd.ipat:
            return self.general_zap(ZAP_ALL)
        if not vcpu.mtrr.enabled:
            return ZapDecision(zap_event=True)
        ranges: list[GfnRange] = []
        if any(t != default for t in vcpu.mtrr.fixed_types()):
            ranges.append(FIXED_AREA)
        ranges.extend(rng for rng, t in vcpu.mtrr.valid_ranges() if t != default)
        return ZapDecision(
            zap_event=True,
            ranges=tuple(ranges),
            route=Route.LIST,
            on_alloc_failure=AllocFailure.CLEAR_LIST_AND_ZAP_ALL,
        )


class FineGrainedSplit(FineGrained):
    """Patch 11: ranges on the general path (MTRR-write zaps and patch 10's zap-all) are cut
    into their intersections with the memslots; the fine-grained ranges stay whole."""

    split = True


#: (name, row, strategy class) of the rows patch 12 was measured with.
SHARED_ROWS = (
    ("zap-all-shared", "Base2 + patch 12", ZapAll),
    ("fine-grained-shared", "Base2 + patches 9+10+12", FineGrained),
    ("fine-grained-split-shared", "Base2 + patches 9+10+11+12", FineGrainedSplit),
)


def _shared(name: str, row: str, cls: type[ZapAll]) -> StrategySpec:
    return StrategySpec(
        name,
        f"The series' {row}: the decisions of the row without patch 12, each zap run under "
        "the MMU lock held for read: entries wholly inside the range are zapped with their "
        "subtrees, a huge leaf straddling its edge is left in place, one TLB flush per entry.",
        Profile.KVM_6_7,
        lambda options: cls(),
        known_gaps=SHARED_GAPS,
        mmu_lock=MmuLock.READ,
    )


@hookimpl
def mtrremu_strategies() -> Iterable[StrategySpec]:
    return (
        *(_shared(*row) for row in SHARED_ROWS),
        StrategySpec(
            "zap-all",
            "The series' Base2 (patches 6-8): every guest CD toggle zaps all; MTRR writes zap "
            "directly unless the writer has CD=1; CD=1 faults are WB without IPAT.",
            Profile.KVM_6_7,
            lambda options: ZapAll(),
            known_gaps=SERIES_GAPS,
        ),
        StrategySpec(
            "zap-all-serialized",
            "Base2 + patch 9: the same zaps, queued on a VM-wide list in length order; a vCPU "
            "drains it while the others wait, identical queued ranges are zapped once.",
            Profile.KVM_6_7,
            lambda options: ZapAllSerialized(),
            known_gaps=SERIES_GAPS,
        ),
        StrategySpec(
            "fine-grained",
            "Base2 + patches 9-10 (the seed): a CD toggle queues only [0, 1 MiB) and the "
            "variable ranges whose type differs from the default, unless the CD=1 type "
            "differs from the default (then zap all).",
            Profile.KVM_6_7,
            lambda options: FineGrained(),
            known_gaps=SERIES_GAPS,
        ),
        StrategySpec(
            "fine-grained-split",
            "Base2 + patches 9-11: as fine-grained, and general-path ranges (MTRR writes, "
            "zap-all) are split into their memslot parts before queueing.",
            Profile.KVM_6_7,
            lambda options: FineGrainedSplit(),
            known_gaps=SERIES_GAPS,
        ),
    )
