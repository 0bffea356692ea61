"""Operations a guest or VMM performs on a VM, and what each one did.

Operations are plain records (slotted dataclasses: cheap to build on the high-rate path; treat
them as immutable) so workloads, traces, batches and bursts can carry them;
:meth:`mtrremu.core.vm.Vm.apply` runs any of them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from collections.abc import Mapping as MappingOf
from dataclasses import dataclass, field

from mtrremu.core.counters import Counters
from mtrremu.core.ept import PopulateOutcome
from mtrremu.core.memtype import EptMemtype
from mtrremu.core.strategy import StrategyFailure
from mtrremu.core.units import Level
from mtrremu.core.zap_engine import ZapReport


@dataclass(slots=True)
class WriteMsr:
    """WRMSR by the guest, or a host-initiated write (KVM_SET_MSRS) with ``host=True``."""

    vcpu: int
    msr: int
    value: int
    host: bool = False


@dataclass(slots=True)
class ReadMsr:
    vcpu: int
    msr: int
    host: bool = False


@dataclass(slots=True)
class WriteCr0:
    """MOV to CR0 by the guest, or a host write (KVM_SET_SREGS) with ``host=True``."""

    vcpu: int
    value: int
    host: bool = False


@dataclass(slots=True)
class Reset:
    vcpu: int


@dataclass(slots=True)
class Init:
    vcpu: int


@dataclass(slots=True)
class Access:
    """A guest touch of one page."""

    vcpu: int
    gfn: int


@dataclass(slots=True)
class FaultRange:
    """A guest touching every page of ``[start, end)`` (gfns) in ascending order."""

    vcpu: int
    start: int
    end: int


@dataclass(slots=True)
class AttachDma:
    """A non-coherent DMA device attached at run time (an event, unlike one at creation)."""


@dataclass(slots=True)
class DetachDma:
    pass


Op = WriteMsr | ReadMsr | WriteCr0 | Reset | Init | Access | FaultRange | AttachDma | DetachDma
VCPU_OPS = (WriteMsr, ReadMsr, WriteCr0, Reset, Init, Access, FaultRange)
VcpuOp = WriteMsr | ReadMsr | WriteCr0 | Reset | Init | Access | FaultRange


@dataclass(frozen=True)
class Burst:
    """Per-vCPU operation lists acting at the same time (semantics.md §7).

    ``lanes`` holds ``(vcpu, operations)`` pairs; every operation of a lane is on that vCPU.
    ``seed`` fixes the order within each lock-step round.
    """

    lanes: tuple[tuple[int, tuple[VcpuOp, ...]], ...]
    seed: int = 0


#: Anything a replay carries: one operation, or a burst of them.
Item = Op | Burst


class AccessKind(enum.Enum):
    HIT = "hit"
    FAULT = "fault"
    MMIO = "mmio"


@dataclass(frozen=True)
class Mapping:
    """The leaf that serves an access."""

    level: Level
    base_gfn: int
    memtype: EptMemtype


@dataclass(frozen=True)
class AccessInfo:
    kind: AccessKind
    mapping: Mapping | None = None
    refault: bool = False


@dataclass(frozen=True)
class PopulateInfo:
    """A bulk fault: leaves installed (faults), pages that hit, pages outside every memslot."""

    outcome: PopulateOutcome
    hits: int
    outside_memslots: int


@dataclass(frozen=True)
class Refused:
    """An operation or burst the emulator refused (a request error, not a guest #GP).

    Nothing changed. ``status``, ``reason`` and ``metadata`` come from the error (see
    :mod:`mtrremu.core.errors`).
    """

    item: Item
    status: str
    reason: str
    message: str
    metadata: MappingOf[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class EventResult:
    """What one operation did. Only the fields its kind produces are set.

    ``gp`` is the reason of a guest #GP (the VMM injects it; nothing changed). ``counters``
    holds this event's own counts, including zaps it drained on behalf of other vCPUs; it is
    created on first use, so events that count nothing stay cheap (``counted`` is False).
    """

    op: Op
    gp: str | None = None
    zap: ZapReport | None = None
    value: int | None = None
    access: AccessInfo | None = None
    populate: PopulateInfo | None = None
    cd_toggled: bool = False
    #: The strategy failed on this event (the VM zapped everything in its place).
    strategy_failure: StrategyFailure | None = None
    own_counters: Counters | None = field(default=None, repr=False)

    @property
    def counters(self) -> Counters:
        if self.own_counters is None:
            self.own_counters = Counters()
        return self.own_counters

    @property
    def counted(self) -> bool:
        return self.own_counters is not None


@dataclass
class BurstResult:
    """Each lane's results, in the lane's own operation order."""

    burst: Burst
    lanes: dict[int, list[EventResult | Refused]]


ItemResult = EventResult | Refused | BurstResult


def operation_results(results: Iterable[ItemResult]) -> Iterator[EventResult | Refused]:
    """Every operation's result, bursts opened lane by lane."""
    for result in results:
        if isinstance(result, BurstResult):
            for lane in result.lanes.values():
                yield from lane
        else:
            yield result
