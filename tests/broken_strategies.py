"""A plugin module of broken strategies, one mistake each, loaded with ``--plugin
tests.broken_strategies`` (or ``PluginManager(modules=...)``) by the isolation tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mtrremu_strategies.series import ZapAll

from mtrremu.plugin import (
    GfnRange,
    Profile,
    StrategyFactory,
    StrategySpec,
    VcpuView,
    VmView,
    ZapDecision,
    hookimpl,
)


class Raises(ZapAll):
    """Raises on every CR0.CD toggle."""

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        raise KeyError("no such range")


class ReturnsNone(ZapAll):
    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return None  # type: ignore[return-value]


class BadRanges(ZapAll):
    """Builds a decision whose ranges are a list of ints."""

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return ZapDecision(zap_event=True, ranges=[0, 1])  # type: ignore[arg-type]


class NoDma:
    """Lacks on_dma_transition."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        return ZapDecision(zap_event=True, ranges=(GfnRange(0, 1),))

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return ZapDecision()


def _factory_raises(options: Mapping[str, str]) -> Any:
    raise RuntimeError("cannot open the config file")


def _spec(name: str, factory: StrategyFactory) -> StrategySpec:
    return StrategySpec(name, f"broken on purpose: {name}", Profile.KVM_6_7, factory)


#: name -> what the failure report must name (the hook).
HOOKS = {
    "broken-raises": "on_cd_toggle",
    "broken-returns-none": "on_cd_toggle",
    "broken-bad-ranges": "on_cd_toggle",
    "broken-no-dma": "factory",
    "broken-factory": "factory",
}


@hookimpl
def mtrremu_strategies() -> Iterable[StrategySpec]:
    return [
        _spec("broken-raises", lambda options: Raises()),
        _spec("broken-returns-none", lambda options: ReturnsNone()),
        _spec("broken-bad-ranges", lambda options: BadRanges()),
        _spec("broken-no-dma", lambda options: NoDma()),  # type: ignore[arg-type,return-value]
        _spec("broken-factory", _factory_raises),
    ]
