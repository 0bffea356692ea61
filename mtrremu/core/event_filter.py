"""Event filtering: MTRR writes a VM keeps from its strategy (docs/semantics.md#event-filtering).

Any strategy can take it, through the ``events`` option every strategy accepts. A filtered
write still changes the registers (and the oracle still checks its effect); only the strategy
is not asked, so nothing is zapped for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrremu.core import msrs
from mtrremu.core.errors import InvalidArgument
from mtrremu.core.mtrr_state import MtrrState

#: The option's name, and its help text for strategy listings.
OPTION = "events"
OPTION_HELP = (
    "which MTRR writes reach the strategy: 'all' (default), 'changed' (not those leaving the "
    "MSR's value as it was), 'acrn' (while the writer has CR0.CD=1, only MTRRdefType writes "
    "that flip E), or 'changed+acrn'"
)
_MODES = ("changed", "acrn")


@dataclass(frozen=True)
class EventFilter:
    """Which accepted MTRR writes the VM keeps from its strategy."""

    #: Drop a write that leaves the MSR's value as it was.
    unchanged: bool = False
    #: While the writer has CR0.CD=1, drop every MTRR write except a defType write that flips
    #: E: firmware and kernels change MTRRs between E=0 and E=1 with caches disabled, so those
    #: two points are the only ones that matter there (what ACRN does).
    acrn: bool = False

    @property
    def active(self) -> bool:
        return self.unchanged or self.acrn

    def drops(self, mtrr: MtrrState, cd: bool, msr: int, value: int) -> bool:
        """Whether the write of ``value`` to ``msr`` (accepted, not yet stored) is dropped."""
        old = mtrr.read(msr)
        if self.unchanged and old == value:
            return True
        if self.acrn and cd:
            return not (msr == msrs.DEFTYPE and (old ^ value) & msrs.DEFTYPE_E)
        return False

    @classmethod
    def parse(cls, text: str) -> EventFilter:
        """``all``, ``changed``, ``acrn`` or ``changed+acrn`` (any order; ``,`` works too)."""
        words = {w.strip() for w in text.replace(",", "+").split("+") if w.strip()}
        if words == {"all"}:
            return cls()
        unknown = sorted(words - set(_MODES))
        if unknown or not words:
            raise InvalidArgument(
                f"option {OPTION}={text!r}: expected all, changed, acrn or changed+acrn"
            )
        return cls(unchanged="changed" in words, acrn="acrn" in words)

    def __str__(self) -> str:
        words = [w for w, on in zip(_MODES, (self.unchanged, self.acrn), strict=True) if on]
        return "+".join(words) or "all"


#: No filtering: every accepted MTRR write reaches the strategy.
ALL_EVENTS = EventFilter()
