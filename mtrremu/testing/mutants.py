"""Deliberately broken zap strategies: one plausible bug each, for judging workloads and oracles.

A workload has detection power when the staleness oracle reports these strategies STALE on it.
Each mutant is the series' own strategy (``zap-all`` or ``fine-grained``) with one mistake a
strategy author could make; most keep the series' zap-event counts, so counting alone cannot
tell them from a correct strategy. They are registered through the public plugin API but not
installed as an entry point: load them with ``mtrremu ab --plugin mtrremu.testing.mutants`` (or
``mtrremu serve --plugin …``); ``scripts/mutants.py`` runs them all.

The bugs (strategy name: mistake):

=============================  ================================================================
``mutant-zaps-nothing``        answers every event with "no zap"
``mutant-counts-only``         counts Base2's zap events but zaps nothing
``mutant-skips-cd``            never zaps on CR0.CD toggles
``mutant-skips-mtrr-writes``   never zaps on MTRR writes
``mutant-skips-disabled``      an event that leaves the vCPU's MTRRs disabled zaps nothing
``mutant-halves-ranges``       zaps only the lower half of every range
``mutant-off-by-one``          every range ends one page early
``mutant-no-fixed-area``       ignores the fixed-range area below 1 MiB
``mutant-first-var-only``      takes only the first variable range (KVM's list order)
``mutant-trusts-others``       skips a range another vCPU already asked for
``mutant-zaps-before``         zaps when caches are disabled, before the MTRRs change
``mutant-forgets-dma``         forgets the non-coherent DMA 0↔1 zap
``mutant-inverted-cd-rule``    zaps MTRR writes only while the writer has CD=1
=============================  ================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from mtrremu_strategies.series import FIXED_AREA, FineGrained, ZapAll

from mtrremu.plugin import (
    NO_ZAP,
    GfnRange,
    Profile,
    StrategyFactory,
    StrategySpec,
    VcpuView,
    VmView,
    ZapDecision,
    ZapStrategy,
    hookimpl,
    kvm_mtrr_write_range,
    msr_name,
)


class ZapsNothing:
    """Answers every event with "no zap": no zap events, nothing zapped."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return NO_ZAP

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return NO_ZAP

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return NO_ZAP


class CountsOnly(ZapAll):
    """Base2 that reports every zap event it should make, with no range to zap."""

    def general_zap(self, rng: GfnRange) -> ZapDecision:
        return ZapDecision(zap_event=True)

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return NO_ZAP


class SkipsCd(ZapAll):
    """Base2 without its CD-toggle zap (Base1's quirk-on habit under Base2's MTRR rule)."""

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return NO_ZAP


class SkipsMtrrWrites(ZapAll):
    """Base2 that trusts the CD toggles to cover every MTRR change."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return NO_ZAP


class SkipsDisabled(FineGrained):
    """Fine-grained that reads "MTRRs disabled" as "nothing is typed by them, nothing to zap"."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return super().on_mtrr_write(vm, vcpu, msr) if vcpu.mtrr.enabled else NO_ZAP

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        if not vcpu.mtrr.enabled:
            return ZapDecision(zap_event=True)
        return super().on_cd_toggle(vm, vcpu)


class RangeMistake(FineGrained):
    """Fine-grained whose every range goes through :meth:`mangle` (a range arithmetic bug)."""

    @staticmethod
    def mangle(rng: GfnRange) -> GfnRange:
        raise NotImplementedError

    def _mangled(self, decision: ZapDecision) -> ZapDecision:
        if not decision.ranges:
            return decision
        return replace(decision, ranges=tuple(self.mangle(r) for r in decision.ranges))

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return self._mangled(super().on_mtrr_write(vm, vcpu, msr))

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self._mangled(super().on_cd_toggle(vm, vcpu))

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return self._mangled(super().on_dma_transition(vm, attached))


class HalvesRanges(RangeMistake):
    """Zaps ``[start, start + pages / 2)``: a length computed in the wrong unit."""

    @staticmethod
    def mangle(rng: GfnRange) -> GfnRange:
        return GfnRange(rng.start, rng.start + rng.pages // 2)


class OffByOne(RangeMistake):
    """Treats the exclusive end as inclusive and subtracts one: the last page is never zapped."""

    @staticmethod
    def mangle(rng: GfnRange) -> GfnRange:
        # A wrapped range (a base written under a never-written mask) ends at 0: stays empty.
        return GfnRange(rng.start, max(rng.end - 1, 0))


class NoFixedArea(FineGrained):
    """Forgets the 88 fixed ranges: no zap for fixed-MSR writes, no [0, 1 MiB) on CD toggles."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        if msr_name(msr).startswith("MTRRfix"):
            return NO_ZAP
        return super().on_mtrr_write(vm, vcpu, msr)

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        decision = super().on_cd_toggle(vm, vcpu)
        kept = tuple(r for r in decision.ranges if r != FIXED_AREA)
        return replace(decision, ranges=kept)


class FirstVariableOnly(FineGrained):
    """Queues only the first variable range that differs from the default (``break`` where a
    ``continue`` belonged)."""

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        decision = super().on_cd_toggle(vm, vcpu)
        fixed = decision.ranges[:1] == (FIXED_AREA,)
        if len(decision.ranges) <= 1 + fixed:
            return decision
        return replace(decision, ranges=decision.ranges[: 2 if fixed else 1])


class TrustsOthers(FineGrained):
    """Drops a range that another vCPU already asked for, as if that request were still queued
    (de-duplicating against everything ever requested, not against the live zap list)."""

    def __init__(self) -> None:
        self._asked_by: dict[GfnRange, int] = {}

    def _own(self, vcpu: VcpuView, decision: ZapDecision) -> ZapDecision:
        kept = []
        for rng in decision.ranges:
            if self._asked_by.setdefault(rng, vcpu.index) == vcpu.index:
                kept.append(rng)
        return replace(decision, ranges=tuple(kept))

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return self._own(vcpu, super().on_mtrr_write(vm, vcpu, msr))

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return self._own(vcpu, super().on_cd_toggle(vm, vcpu))


class ZapsBefore(FineGrained):
    """Zaps when a vCPU disables caches (CD 0→1), reading the MTRRs it is about to rewrite,
    and not when it enables them again (CD 1→0) after the change."""

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        if vcpu.cd:
            return super().on_cd_toggle(vm, vcpu)
        return ZapDecision(zap_event=True)


class ForgetsDma(FineGrained):
    """Fine-grained without the zap on non-coherent DMA 0↔1 (patch 5)."""

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return NO_ZAP


class InvertedCdRule(ZapAll):
    """Base2's MTRR-write rule backwards: zaps MTRR writes only while the writer has CD=1."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        rng = kvm_mtrr_write_range(vcpu, msr) if vcpu.cd else None
        return NO_ZAP if rng is None else self.general_zap(rng)


#: name → (strategy class, the bug in one line): the one table the plugin hook serves.
MUTANTS: dict[str, tuple[Callable[[], ZapStrategy], str]] = {
    "mutant-zaps-nothing": (ZapsNothing, "answers every event with 'no zap'"),
    "mutant-counts-only": (CountsOnly, "counts Base2's zap events but zaps nothing"),
    "mutant-skips-cd": (SkipsCd, "Base2 that never zaps on CR0.CD toggles"),
    "mutant-skips-mtrr-writes": (SkipsMtrrWrites, "Base2 that never zaps on MTRR writes"),
    "mutant-skips-disabled": (
        SkipsDisabled,
        "fine-grained that zaps nothing for an event leaving the vCPU's MTRRs disabled",
    ),
    "mutant-halves-ranges": (HalvesRanges, "fine-grained zapping the lower half of each range"),
    "mutant-off-by-one": (OffByOne, "fine-grained whose ranges end one page early"),
    "mutant-no-fixed-area": (NoFixedArea, "fine-grained that ignores the fixed ranges"),
    "mutant-first-var-only": (
        FirstVariableOnly,
        "fine-grained that queues only the first differing variable range",
    ),
    "mutant-trusts-others": (
        TrustsOthers,
        "fine-grained that skips a range another vCPU already asked for",
    ),
    "mutant-zaps-before": (
        ZapsBefore,
        "fine-grained that zaps when caches are disabled, before the MTRRs change",
    ),
    "mutant-forgets-dma": (ForgetsDma, "fine-grained without the non-coherent DMA 0<->1 zap"),
    "mutant-inverted-cd-rule": (
        InvertedCdRule,
        "Base2 that zaps MTRR writes only while the writer has CD=1",
    ),
}


def _factory(make: Callable[[], ZapStrategy]) -> StrategyFactory:
    return lambda options: make()


@hookimpl
def mtrremu_strategies() -> Iterable[StrategySpec]:
    return [
        StrategySpec(name, f"MUTANT (deliberately broken): {bug}.", Profile.KVM_6_7, _factory(make))
        for name, (make, bug) in MUTANTS.items()
    ]
