"""Observers: tracing and metrics see every zap, fault and handled event.

The VM calls one :class:`Observer` object; the plugin layer adapts pluggy's observer hooks to
it. When nothing observes, the VM gets :data:`NULL_OBSERVER` and pays one attribute check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from mtrremu.core.ept import ZapOutcome
from mtrremu.core.units import GfnRange

if TYPE_CHECKING:
    from mtrremu.core.events import EventResult


class Observer(Protocol):
    """Called synchronously on the thread that caused the event; must not call back into the VM."""

    #: False lets the VM skip building observer arguments entirely.
    active: bool

    def zap_executed(self, vm_id: str, rng: GfnRange, outcome: ZapOutcome) -> None: ...

    def fault(self, vm_id: str, vcpu: int, result: EventResult) -> None: ...

    def event_handled(self, vm_id: str, result: EventResult) -> None: ...


class NullObserver:
    """Observes nothing."""

    active = False

    def zap_executed(self, vm_id: str, rng: GfnRange, outcome: ZapOutcome) -> None:
        return None

    def fault(self, vm_id: str, vcpu: int, result: EventResult) -> None:
        return None

    def event_handled(self, vm_id: str, result: EventResult) -> None:
        return None


NULL_OBSERVER = NullObserver()
