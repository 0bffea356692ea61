"""Messages ↔ domain objects for the ``mtrremu.v1`` API. No behaviour lives here.

Requests become core operations (malformed ones raise :class:`InvalidArgument`); core results
become outcome messages. The client uses the same functions the other way round where it needs
domain objects (configurations, counters).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as MappingOf
from typing import Any, Literal

from google.rpc import code_pb2

from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.counters import COUNTER_NAMES, Counters
from mtrremu.core.ept import Entry, decode_leaf
from mtrremu.core.errors import InvalidArgument, InvalidConfig, MtrremuError
from mtrremu.core.events import (
    Access,
    AccessKind,
    AttachDma,
    Burst,
    BurstResult,
    DetachDma,
    EventResult,
    FaultRange,
    Init,
    Item,
    ItemResult,
    Mapping,
    ReadMsr,
    Refused,
    Reset,
    VcpuOp,
    WriteCr0,
    WriteMsr,
)
from mtrremu.core.memtype import EptMemtype, Precedence, Profile
from mtrremu.core.memtypes import MemType
from mtrremu.core.oracle import StaleLeaf, StaleReport
from mtrremu.core.units import LEAF_LEVELS_DESCENDING, PAGE_SHIFT, PAGE_SIZE, Level
from mtrremu.core.vm import StalenessLog, Vm
from mtrremu.core.zap_list import Role
from mtrremu.rpc.status import trimmed
from mtrremu.v1 import emulator_pb2 as pb

#: Ranges a ZapSummary lists (the totals count them all): answers stay bounded in size.
MAX_LISTED_RANGES = 16

#: The API's memory types are 0x100 + the architectural encoding (see emulator.proto).
MEMORY_TYPE_BASE = 0x100
_MEMTYPES: dict[MemType, pb.MemoryType.ValueType] = {
    t: pb.MemoryType.ValueType(MEMORY_TYPE_BASE | t) for t in MemType if t is not MemType.UC_MINUS
}
_LEVELS = {level: pb.Level.Value(f"LEVEL_{level.label}") for level in LEAF_LEVELS_DESCENDING}
_LEVELS_BACK = {v: k for k, v in _LEVELS.items()}
_PROFILES = {
    Profile.KVM_6_5: pb.PROFILE_KVM_6_5,
    Profile.KVM_6_7: pb.PROFILE_KVM_6_7,
    Profile.KVM_6_11: pb.PROFILE_KVM_6_11,
}
_ACCESS = {
    AccessKind.HIT: pb.ACCESS_KIND_HIT,
    AccessKind.FAULT: pb.ACCESS_KIND_FAULT,
    AccessKind.MMIO: pb.ACCESS_KIND_MMIO_EXIT,
}
_ROLES = {Role.DRAINED: pb.ZAP_ROLE_DRAINED, Role.WAITED: pb.ZAP_ROLE_WAITED}
_PRECEDENCES = {Precedence.KVM: pb.PRECEDENCE_KVM, Precedence.SDM: pb.PRECEDENCE_SDM}
_PRECEDENCES_BACK = {v: k for k, v in _PRECEDENCES.items()} | {
    pb.PRECEDENCE_UNSPECIFIED: Precedence.KVM
}
_MEMSLOT_KINDS = {MemslotKind.RAM: pb.MEMSLOT_KIND_RAM, MemslotKind.DEVICE: pb.MEMSLOT_KIND_DEVICE}
_MEMSLOT_KINDS_BACK = {v: k for k, v in _MEMSLOT_KINDS.items()} | {
    pb.MEMSLOT_KIND_UNSPECIFIED: MemslotKind.RAM
}
#: Optional VmConfig fields: absent means the core's default.
_OptionalField = Literal["quirk_cd_nw_cleared", "feature_mtrr", "tdp", "guest_maxphyaddr"]
_OPTIONAL_FIELDS: tuple[_OptionalField, ...] = typing.get_args(_OptionalField)


def profile_message(profile: Profile) -> pb.Profile.ValueType:
    return _PROFILES[profile]


# -- configuration ------------------------------------------------------------------------


def vm_config(message: pb.VmConfig) -> VmConfig:
    """A core configuration from a request; absent optional fields take the defaults."""
    args: dict[str, Any] = {
        name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)
    }
    if message.max_mapping_level:
        level = _LEVELS_BACK.get(message.max_mapping_level)
        if level is None:
            raise InvalidConfig(f"unknown max_mapping_level {message.max_mapping_level}")
        args["max_mapping_level"] = level
    precedence = _PRECEDENCES_BACK.get(message.precedence)
    if precedence is None:
        raise InvalidConfig(f"unknown precedence {message.precedence}")
    if message.memslots:
        args["memslots"] = tuple(_memslot(slot) for slot in message.memslots)
    return VmConfig(
        vcpus=message.vcpus or 1,
        noncoherent_dma=message.noncoherent_dma,
        precedence=precedence,
        zap_list_posted_window=message.zap_list_posted_window,
        track_staleness=message.track_staleness,
        **args,
    )


def _memslot(message: pb.Memslot) -> Memslot:
    kind = _MEMSLOT_KINDS_BACK.get(message.kind)
    if kind is None:
        raise InvalidConfig(f"memslot {message.name!r}: unknown kind {message.kind}")
    if not message.size_bytes:
        raise InvalidConfig(f"memslot {message.name!r} at {message.base_gpa:#x} is empty")
    return Memslot.from_bytes(message.base_gpa, message.size_bytes, kind, message.name)


def vm_config_message(config: VmConfig) -> pb.VmConfig:
    return pb.VmConfig(
        vcpus=config.vcpus,
        quirk_cd_nw_cleared=config.quirk_cd_nw_cleared,
        feature_mtrr=config.feature_mtrr,
        tdp=config.tdp,
        noncoherent_dma=config.noncoherent_dma,
        guest_maxphyaddr=config.guest_maxphyaddr,
        memslots=[
            pb.Memslot(
                base_gpa=slot.base_gfn << PAGE_SHIFT,
                size_bytes=slot.pages << PAGE_SHIFT,
                kind=_MEMSLOT_KINDS[slot.kind],
                name=slot.name,
            )
            for slot in config.memslots
        ],
        max_mapping_level=_LEVELS[config.max_mapping_level],
        precedence=_PRECEDENCES[config.precedence],
        zap_list_posted_window=config.zap_list_posted_window,
        track_staleness=config.track_staleness,
    )


def leaf_counts(counts: MappingOf[Level, int], into: pb.LeafCounts | None = None) -> pb.LeafCounts:
    message = pb.LeafCounts() if into is None else into
    message.leaves_4k = counts[Level.K4]
    message.leaves_2m = counts[Level.M2]
    message.leaves_1g = counts[Level.G1]
    return message


def vm_message(vm: Vm, options: MappingOf[str, str]) -> pb.Vm:
    return pb.Vm(
        vm_id=vm.vm_id,
        config=vm_config_message(vm.config),
        strategy=vm.strategy_name,
        strategy_options=dict(options),
        profile=_PROFILES[vm.profile],
        noncoherent_dma=vm.noncoherent_dma,
        leaves=leaf_counts(vm.store.leaf_counts()),
    )


# -- counters -------------------------------------------------------------------------------


def counters_message(counters: Counters, into: pb.Counters | None = None) -> pb.Counters:
    message = pb.Counters() if into is None else into
    for name in COUNTER_NAMES:
        value = getattr(counters, name)
        if value:
            setattr(message, name, value)
    return message


def counters(message: pb.Counters) -> Counters:
    return Counters(**{name: getattr(message, name) for name in COUNTER_NAMES})


# -- operations ---------------------------------------------------------------------------


_HOST: dict[int, bool] = {
    pb.INITIATOR_UNSPECIFIED: False,
    pb.INITIATOR_GUEST: False,
    pb.INITIATOR_HOST: True,
}


def _host(initiator: int) -> bool:
    """INITIATOR_UNSPECIFIED means the guest."""
    host = _HOST.get(initiator)
    if host is None:
        raise InvalidArgument(f"unknown initiator {initiator}")
    return host


def _gfn(gpa: int, what: str) -> int:
    if gpa % PAGE_SIZE:
        raise InvalidArgument(f"{what} {gpa:#x} is not 4 KiB aligned")
    return gpa >> PAGE_SHIFT


def write_msr(m: pb.WriteMsrOperation) -> WriteMsr:
    return WriteMsr(m.vcpu, m.msr, m.value, _host(m.initiator))


def read_msr(m: pb.ReadMsrOperation) -> ReadMsr:
    return ReadMsr(m.vcpu, m.msr, _host(m.initiator))


def write_cr0(m: pb.WriteCr0Operation) -> WriteCr0:
    return WriteCr0(m.vcpu, m.value, _host(m.initiator))


def access(m: pb.AccessGpaOperation) -> Access:
    return Access(m.vcpu, m.gpa >> PAGE_SHIFT)


def fault_range(m: pb.FaultRangeOperation) -> FaultRange:
    return FaultRange(m.vcpu, _gfn(m.start_gpa, "start_gpa"), _gfn(m.end_gpa, "end_gpa"))


#: Oneof field name -> converter of that field's message.
_OPERATIONS: dict[str, Callable[[Any], Item]] = {
    "write_msr": write_msr,
    "write_cr0": write_cr0,
    "access_gpa": access,
    "read_msr": read_msr,
    "fault_range": fault_range,
    "reset_vcpu": lambda m: Reset(m.vcpu),
    "init_vcpu": lambda m: Init(m.vcpu),
    "attach_dma": lambda m: AttachDma(),
    "detach_dma": lambda m: DetachDma(),
}


def operation(message: pb.Operation, *, in_burst: bool = False) -> Item:
    """One batch operation as a core item."""
    kind = message.WhichOneof("kind")
    convert = _OPERATIONS.get(kind or "")
    if convert is not None:
        return convert(getattr(message, kind or ""))
    if kind == "burst":
        if in_burst:
            raise InvalidArgument("a burst cannot hold another burst")
        return _burst(message.burst)
    raise InvalidArgument("an operation must set one of its kinds")


def _burst(message: pb.Burst) -> Burst:
    lanes = []
    for lane in message.lanes:
        ops: list[VcpuOp] = []
        for op in lane.operations:
            item = operation(op, in_burst=True)
            if isinstance(item, (AttachDma, DetachDma, Burst)):
                raise InvalidArgument(f"burst lane of vCPU {lane.vcpu} holds {type(item).__name__}")
            ops.append(item)
        lanes.append((lane.vcpu, tuple(ops)))
    return Burst(tuple(lanes), message.seed)


def batch_size(operations: Sequence[pb.Operation]) -> int:
    """Operations a batch stands for: each entry, plus every lane operation of a burst."""
    return len(operations) + sum(
        len(lane.operations) for op in operations if op.HasField("burst") for lane in op.burst.lanes
    )


# -- results ------------------------------------------------------------------------------


def memtype_fields(memtype: EptMemtype) -> tuple[pb.MemoryType.ValueType, bool]:
    return _MEMTYPES[memtype.type], memtype.ipat


def mapping_message(
    place: Mapping | Entry | StaleLeaf, memtype: EptMemtype, into: pb.Mapping
) -> None:
    """Fill ``into``: a leaf at ``place`` (its base and level) with ``memtype``."""
    into.base_gpa = place.base_gfn << PAGE_SHIFT
    into.level = _LEVELS[place.level]
    into.memory_type, into.ipat = memtype_fields(memtype)


def outcome_message(result: EventResult, into: pb.EventOutcome | None = None) -> pb.EventOutcome:
    """The message form of one event's result."""
    message = pb.EventOutcome() if into is None else into
    if result.gp is not None:
        message.guest_fault.reason = result.gp
    zap = result.zap
    if zap is not None:
        summary = message.zap
        summary.zap_event = zap.zap_event
        for rng in zap.requested[:MAX_LISTED_RANGES]:
            summary.requested.add(start_gfn=rng.start, end_gfn=rng.end)
        for ticket in zap.tickets[:MAX_LISTED_RANGES]:
            summary.queued.add(start_gfn=ticket.range.start, end_gfn=ticket.range.end)
        summary.requested_total = len(zap.requested)
        summary.queued_total = len(zap.tickets)
        if zap.role is not None:
            summary.role = _ROLES[zap.role]
        summary.alloc_failed = zap.alloc_failed
    if result.counted:
        counters_message(result.counters, message.counters)
    else:
        message.counters.SetInParent()
    if result.value is not None:
        message.value = result.value
    if result.access is not None:
        access_message = message.access
        access_message.kind = _ACCESS[result.access.kind]
        if result.access.mapping is not None:
            mapping = result.access.mapping
            mapping_message(mapping, mapping.memtype, access_message.mapping)
        access_message.refault = result.access.refault
    if result.populate is not None:
        populate, fault_range = result.populate, message.fault_range
        fault_range.faults = populate.outcome.faults
        fault_range.refaults = populate.outcome.refaults
        fault_range.hits = populate.hits
        fault_range.outside_memslots = populate.outside_memslots
        leaf_counts(populate.outcome.installed, fault_range.installed)
    if result.cd_toggled:
        message.cd_toggled = True
    if result.strategy_failure is not None:
        message.strategy_failure.hook = result.strategy_failure.hook
        message.strategy_failure.error = trimmed(result.strategy_failure.error)
    return message


def error_message(refused: Refused | MtrremuError, into: pb.OperationError) -> None:
    """Fill ``into``; the message is trimmed as a status message would be, so every result
    stays within the size the server's limits assume."""
    into.status = refused.status
    into.code = code_pb2.Code.Value(refused.status)
    into.reason = refused.reason
    into.message = trimmed(refused.message if isinstance(refused, Refused) else str(refused))
    metadata = refused.metadata if isinstance(refused, Refused) else refused.metadata()
    for key, value in metadata.items():
        into.metadata[key] = trimmed(value)


def result_message(result: ItemResult, into: pb.OperationResult) -> None:
    """Fill one batch result."""
    if isinstance(result, EventResult):
        outcome_message(result, into.outcome)
    elif isinstance(result, Refused):
        error_message(result, into.error)
    else:
        _burst_result(result, into)


def _burst_result(result: BurstResult, into: pb.OperationResult) -> None:
    for vcpu, lane_results in result.lanes.items():
        lane = into.lanes.add(vcpu=vcpu)
        for one in lane_results:
            result_message(one, lane.results.add())


def stale_message(report: StaleReport | None, log: StalenessLog) -> pb.CheckStalenessResponse:
    tracking = pb.StalenessTracking(
        checks=log.checks,
        stale_points=log.stale_points,
        stale_leaves_max=log.stale_leaves_max,
        event_checks=log.event_checks,
        stale_events=log.stale_events,
        stale_event_leaves_max=log.stale_event_leaves_max,
        excused=log.excused,
        first_stale_event=trimmed(log.first_stale_event),
    )
    if report is None:
        return pb.CheckStalenessResponse(quiescent=False, tracking=tracking)
    response = pb.CheckStalenessResponse(
        stale_leaves=report.count, quiescent=True, tracking=tracking
    )
    for leaf in report.examples:
        example = response.examples.add()
        mapping_message(leaf, leaf.have, example.have)
        if leaf.want is not None and not leaf.mixed:
            mapping_message(leaf, leaf.want, example.want)
    return response


def leaf_runs(vm: Vm, per_message: int) -> Iterator[pb.DumpLeavesResponse]:
    """Present leaves, ascending gpa, grouped into runs of one level and memory type,
    ``per_message`` runs to a message."""
    response = pb.DumpLeavesResponse()
    for level, start, count, byte in vm.leaf_runs():
        kind, ipat = _leaf_fields(byte)
        response.runs.add(
            start_gpa=start << PAGE_SHIFT,
            leaves=count,
            level=_LEVELS[level],
            memory_type=kind,
            ipat=ipat,
        )
        if len(response.runs) == per_message:
            yield response
            response = pb.DumpLeavesResponse()
    if response.runs:
        yield response


@functools.cache
def _leaf_fields(byte: int) -> tuple[pb.MemoryType.ValueType, bool]:
    """A leaf byte's memory type fields (a byte takes one of 256 values)."""
    return memtype_fields(decode_leaf(byte))


# -- client side: core items as messages ------------------------------------------------


def initiator_message(host: bool) -> pb.Initiator.ValueType:
    return pb.INITIATOR_HOST if host else pb.INITIATOR_GUEST


def operation_message(item: Item) -> pb.Operation:
    """A core operation or burst as a batch operation."""
    if isinstance(item, WriteMsr):
        return pb.Operation(
            write_msr=pb.WriteMsrOperation(
                vcpu=item.vcpu,
                msr=item.msr,
                value=item.value,
                initiator=initiator_message(item.host),
            )
        )
    if isinstance(item, WriteCr0):
        return pb.Operation(
            write_cr0=pb.WriteCr0Operation(
                vcpu=item.vcpu, value=item.value, initiator=initiator_message(item.host)
            )
        )
    if isinstance(item, Access):
        return pb.Operation(
            access_gpa=pb.AccessGpaOperation(vcpu=item.vcpu, gpa=item.gfn << PAGE_SHIFT)
        )
    if isinstance(item, FaultRange):
        return pb.Operation(
            fault_range=pb.FaultRangeOperation(
                vcpu=item.vcpu, start_gpa=item.start << PAGE_SHIFT, end_gpa=item.end << PAGE_SHIFT
            )
        )
    if isinstance(item, ReadMsr):
        return pb.Operation(
            read_msr=pb.ReadMsrOperation(
                vcpu=item.vcpu, msr=item.msr, initiator=initiator_message(item.host)
            )
        )
    if isinstance(item, Reset):
        return pb.Operation(reset_vcpu=pb.ResetVcpuOperation(vcpu=item.vcpu))
    if isinstance(item, Init):
        return pb.Operation(init_vcpu=pb.InitVcpuOperation(vcpu=item.vcpu))
    if isinstance(item, AttachDma):
        return pb.Operation(attach_dma=pb.AttachDmaOperation())
    if isinstance(item, DetachDma):
        return pb.Operation(detach_dma=pb.DetachDmaOperation())
    return pb.Operation(
        burst=pb.Burst(
            seed=item.seed,
            lanes=[
                pb.Lane(vcpu=vcpu, operations=[operation_message(op) for op in ops])
                for vcpu, ops in item.lanes
            ],
        )
    )
