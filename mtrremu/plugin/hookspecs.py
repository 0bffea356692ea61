"""The hook catalogue. Each hook's docstring is its contract.

Registration
    :func:`mtrremu_strategies` — a plugin contributes zap strategies.

Observation (called synchronously on the thread that caused the event; an observer must not
call back into the VM and should be quick: it runs on the emulator's hot path)
    :func:`mtrremu_zap_executed`, :func:`mtrremu_fault`, :func:`mtrremu_event_handled`.
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from mtrremu.core.ept import ZapOutcome
from mtrremu.core.events import EventResult
from mtrremu.core.units import GfnRange
from mtrremu.plugin.records import StrategySpec

hookspec = pluggy.HookspecMarker("mtrremu")

#: The version of this hook catalogue. It grows when a hook is added or a hook's arguments or
#: contract change; a plugin module declaring ``MTRREMU_HOOKSPEC_VERSION = N`` (missing means 1)
#: with N above it is refused as built for a newer mtrremu (docs/plugin-loading.md).
HOOKSPEC_VERSION: int = 1


@hookspec
def mtrremu_strategies() -> Iterable[StrategySpec]:
    """Return the zap strategies this plugin provides, as :class:`StrategySpec` records.

    Called through pluggy once per plugin when the plugin manager starts (built-ins first, then
    the others in pluggy's call order, so ``tryfirst``/``trylast`` apply), with every wrapper of
    this hook around each call; a wrapper sees and may change one plugin's records at a time.
    Names are global: a plugin providing a name already taken is not loaded, and the fault
    names both. A plugin that raises or returns anything but an iterable of records is not
    loaded either; the other plugins are (docs/plugin-loading.md). A strategy object is built
    per VM by the record's factory and then called directly by that VM (never through a hook).
    """
    raise NotImplementedError


@hookspec
def mtrremu_zap_executed(vm_id: str, rng: GfnRange, outcome: ZapOutcome) -> None:
    """A zap of ``rng`` ran on VM ``vm_id``'s EPT: ``outcome`` has leaves removed and entries
    visited per level. Called once per executed zap (direct or drained from the zap list)."""


@hookspec
def mtrremu_fault(vm_id: str, vcpu: int, result: EventResult) -> None:
    """An access or bulk fault by ``vcpu`` installed at least one leaf (``result.access`` or
    ``result.populate`` says what)."""


@hookspec
def mtrremu_event_handled(vm_id: str, result: EventResult) -> None:
    """Any operation on VM ``vm_id`` finished; ``result`` holds its own counters.

    Operations the emulator refuses (bad requests) raise instead and do not reach this hook.
    """
