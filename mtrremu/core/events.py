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
from mtrremu.core.oracle import StalenessLog, StaleReport
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
    """A guest touch of the page holding byte ``gpa`` (any byte address)."""

    vcpu: int
    gpa: int


@dataclass(slots=True)
class FaultRange:
    """A guest touching every page of ``[start_gpa, end_gpa)`` in ascending order (bytes, both
    4 KiB aligned)."""

    vcpu: int
    start_gpa: int
    end_gpa: int


@dataclass(slots=True)
class AttachDma:
    """A non-coherent DMA device attached at run time (an event, unlike one at creation)."""


@dataclass(slots=True)
class DetachDma:
    """One non-coherent DMA device detached (FAILED_PRECONDITION when none is attached)."""


@dataclass(frozen=True, slots=True)
class MsrValue:
    """One MSR and its value."""

    msr: int
    value: int


@dataclass(slots=True)
class WriteMsrs:
    """KVM_SET_MSRS: host-initiated writes in order, stopping at the first one KVM refuses;
    the result says how many were written (``value``) and why the next was refused."""

    vcpu: int
    msrs: tuple[MsrValue, ...]


@dataclass(slots=True)
class ReadVcpuState:
    """A vCPU's whole register state: CR0, PAT and every MTRR MSR (as a host read)."""

    vcpu: int


@dataclass(slots=True)
class LookupGpa:
    """What the EPT holds for the page of byte ``gpa``."""

    gpa: int


@dataclass(slots=True)
class ReadCounters:
    """The VM's counters so far."""


@dataclass(slots=True)
class CheckStaleness:
    """The staleness oracle now, relative to ``vcpu``; with ``at_quiescence``, relative to
    every vCPU at once if they all hold the same MTRRs and CR0.CD (``vcpu`` is ignored)."""

    vcpu: int = 0
    at_quiescence: bool = False


#: Operations on one vCPU: a burst lane may hold them.
VcpuOp = (
    WriteMsr | WriteMsrs | ReadMsr | WriteCr0 | Reset | Init | Access | FaultRange | ReadVcpuState
)
#: Operations on the VM as a whole.
VmOp = AttachDma | DetachDma | LookupGpa | ReadCounters | CheckStaleness
Op = VcpuOp | VmOp


@dataclass(frozen=True)
class Burst:
    """Per-vCPU operation lists acting at the same time (see :mod:`mtrremu.core.burst`).

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
    """The leaf that serves an access: its level, the first byte it maps, its memory type."""

    level: Level
    base_gpa: int
    memtype: EptMemtype


@dataclass(frozen=True)
class Lookup:
    """What the EPT holds for one page: a leaf (``mapping``), a leaf a zap removed
    (``zapped``), an MMIO marker (``mmio``), or nothing."""

    mapping: Mapping | None
    zapped: bool
    mmio: bool
    #: A re-evaluation mark lies on the page's path: the next access re-evaluates its type.
    recalc_pending: bool = False


@dataclass(frozen=True)
class VcpuState:
    """A vCPU's registers as a host reads them back: CR0, PAT and every MTRR MSR."""

    cr0: int
    pat: int
    mtrrs: tuple[MsrValue, ...]


@dataclass(frozen=True)
class StalenessAnswer:
    """The oracle's answer: ``report`` (``None`` when asked at quiescence and the vCPUs
    disagree), whether the VM is quiescent, and what tracking found so far."""

    report: StaleReport | None
    quiescent: bool
    tracking: StalenessLog


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
    #: Why a multi-MSR write stopped (``value`` says how many were written).
    rejected: str | None = None
    lookup: Lookup | None = None
    vm_counters: Counters | None = None
    vcpu_state: VcpuState | None = None
    staleness: StalenessAnswer | None = None
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
