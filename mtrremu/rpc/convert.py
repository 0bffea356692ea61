"""Messages ↔ domain objects for the ``mtrremu.v1`` API. No behaviour lives here.

Requests become core operations (malformed ones raise :class:`InvalidArgument`); core results
become outcome messages. The client uses the same functions the other way round where it needs
domain objects (configurations, counters).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import threading
import typing
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as MappingOf
from typing import Any, Literal, cast

from google.rpc import code_pb2

from mtrremu.core.burst import run_burst
from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.counters import COUNTER_NAMES, Counters
from mtrremu.core.ept import decode_leaf
from mtrremu.core.errors import InvalidArgument, InvalidConfig, MtrremuError
from mtrremu.core.events import (
    AccessKind,
    Burst,
    BurstResult,
    EventResult,
    Item,
    ItemResult,
    Mapping,
    MsrValue,
    Op,
    ReadCounters,
    Refused,
    StalenessAnswer,
    VcpuOp,
    WriteMsr,
)
from mtrremu.core.memtype import EptMemtype, Precedence, Profile
from mtrremu.core.memtypes import MemType
from mtrremu.core.operations import BY_TYPE, OPERATIONS, OperationKind
from mtrremu.core.oracle import STALENESS_COUNTS, StaleLeaf
from mtrremu.core.units import LEAF_LEVELS_DESCENDING, PAGE_SHIFT, U64_MASK, GfnRange, Level
from mtrremu.core.vm import Vm
from mtrremu.core.zap_list import Role
from mtrremu.v1 import emulator_pb2 as pb

#: Ranges a ZapSummary lists (the totals count them all): answers stay bounded in size.
MAX_LISTED_RANGES = 16
#: Messages and metadata values in answers are trimmed to this: an error may quote a huge bad
#: argument, and statuses travel in trailers, which gRPC caps (16 KiB).
MAX_TEXT = 1024


def trimmed(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


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


def vm_message(vm: Vm, options: MappingOf[str, str], *, memslots: bool = True) -> pb.Vm:
    """A VM's description; ListVms leaves the memslots out (``memslot_count`` stays)."""
    config = vm_config_message(vm.config)
    if not memslots:
        del config.memslots[:]
    return pb.Vm(
        vm_id=vm.vm_id,
        config=config,
        memslot_count=len(vm.config.memslots),
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
#
# Driven by the table in mtrremu.core.operations: an operation's protobuf message is the
# Operation oneof field of its name, and its fields are the dataclass's, except ``host``, which
# is the message's ``initiator``, and tuples of MsrValue, which are repeated MsrValue messages.


class _Initiators(dict[int, bool]):
    """``host`` by ``Initiator`` value; an unknown one is refused (a subscript: this runs for
    every operation of a batch)."""

    def __missing__(self, initiator: int) -> bool:
        raise InvalidArgument(f"unknown initiator {initiator}")


_HOST = _Initiators(
    {pb.INITIATOR_UNSPECIFIED: False, pb.INITIATOR_GUEST: False, pb.INITIATOR_HOST: True}
)


def _msrs(entries: Any) -> tuple[MsrValue, ...]:
    return tuple(MsrValue(e.msr, e.value) for e in entries)


def _built(kind: OperationKind) -> str:
    """The expression building a ``kind`` operation from its message ``m``:
    ``build(m.vcpu, m.msr, m.value, _HOST[m.initiator])``."""
    arguments = [
        "_HOST[m.initiator]"
        if f.name == "host"
        else "_msrs(m.msrs)"
        if f.name == "msrs"
        else f"m.{f.name}"
        for f in kind.fields
    ]
    return f"build({', '.join(arguments)})"


def _compiled(kind: OperationKind, body: str) -> Any:
    """``eval(body)`` with ``build`` standing for ``kind``'s dataclass. Conversions run for
    every operation of a batch, so they are compiled from the table once (as :mod:`dataclasses`
    compiles ``__init__``) and read each field directly instead of looping over the fields."""
    return eval(body, {"build": kind.type, "_HOST": _HOST, "_msrs": _msrs})


#: Per operation name: its operation from its message.
_CONVERTERS: dict[str, Callable[[Any], Op]] = {
    kind.name: _compiled(kind, f"lambda m: {_built(kind)}") for kind in OPERATIONS
}
#: Per operation name: its operation from its message, run by the VM's handler for it
#: (``Vm._<name>``, what :meth:`Vm.apply` dispatches to), in one call.
_RUNNERS: dict[str, Callable[[Vm, Any], EventResult]] = {
    kind.name: _compiled(kind, f"lambda vm, m: vm._{kind.name}({_built(kind)}, False)")
    for kind in OPERATIONS
}


def operation_of(kind: OperationKind, message: Any) -> Op:
    """The core operation of ``kind`` that ``message`` (its ``<Rpc>Operation``) stands for."""
    return _CONVERTERS[kind.name](message)


def fill_operation(op: Op, into: Any) -> None:
    """Fill ``into`` (an ``<Rpc>Operation`` message) from ``op``."""
    for field in BY_TYPE[type(op)].fields:
        value = getattr(op, field.name)
        if field.name == "host":
            into.initiator = pb.INITIATOR_HOST if value else pb.INITIATOR_GUEST
        elif field.name == "msrs":
            for entry in value:
                into.msrs.add(msr=entry.msr, value=entry.value)
        else:
            setattr(into, field.name, value)


def operation(message: pb.Operation, *, in_burst: bool = False) -> Item:
    """One batch operation as a core item."""
    name = message.WhichOneof("kind")
    if name == "burst":
        if in_burst:
            raise InvalidArgument("a burst cannot hold another burst")
        return _burst(message.burst)
    convert = _CONVERTERS.get(name or "")
    if convert is None:
        raise InvalidArgument("an operation must set one of its kinds")
    return convert(getattr(message, name or ""))


def execute(vm: Vm, message: pb.Operation, kind: str | None) -> ItemResult:
    """Run one batch operation on ``vm``, whose ``kind`` field is set (as
    :func:`batch_segments` found): what :func:`~mtrremu.core.burst.execute_one` does with
    :func:`operation`'s item, without the layers between (this runs for every operation of a
    batch). A malformed operation or one the emulator refuses raises."""
    run = _RUNNERS.get(kind) if kind is not None else None
    if run is not None:
        return run(vm, getattr(message, kind or ""))
    burst = operation(message)  # a burst, or nothing set (which raises)
    assert isinstance(burst, Burst)
    return run_burst(vm, burst)


#: The single-MSR writes of a list of ``write_msr`` messages (``ms``), as core operations.
_WRITE_MSR_RUN: Callable[[Any], list[WriteMsr]] = _compiled(
    BY_TYPE[WriteMsr], f"lambda ms: [{_built(BY_TYPE[WriteMsr])} for m in ms]"
)


def msr_write_run(operations: Sequence[pb.Operation], start: int, end: int) -> list[WriteMsr]:
    """The single-MSR writes ``operations[start:end]`` (all ``write_msr``) as core operations:
    a run for :meth:`Vm.write_msr_run`. It ends before the first malformed one, if any
    (:func:`execute` refuses that one on its own)."""
    messages = [message.write_msr for message in operations[start:end]]
    try:
        return _WRITE_MSR_RUN(messages)
    except InvalidArgument:
        run: list[WriteMsr] = []
        for message in messages:
            try:
                run.extend(_WRITE_MSR_RUN((message,)))
            except InvalidArgument:
                break
        return run


def _burst(message: pb.Burst) -> Burst:
    lanes = []
    for lane in message.lanes:
        ops: list[VcpuOp] = []
        for op in lane.operations:
            item = operation(op, in_burst=True)
            if isinstance(item, Burst) or not BY_TYPE[type(item)].per_vcpu:
                raise InvalidArgument(f"burst lane of vCPU {lane.vcpu} holds {type(item).__name__}")
            ops.append(cast(VcpuOp, item))
        lanes.append((lane.vcpu, tuple(ops)))
    return Burst(tuple(lanes), message.seed)


def operation_message(item: Item) -> pb.Operation:
    """A core operation or burst as a batch operation."""
    message = pb.Operation()
    if isinstance(item, Burst):
        message.burst.seed = item.seed
        for vcpu, ops in item.lanes:
            lane = message.burst.lanes.add(vcpu=vcpu)
            for op in ops:
                lane.operations.append(operation_message(op))
        return message
    kind = BY_TYPE[type(item)]
    fill_operation(item, getattr(message, kind.name))
    getattr(message, kind.name).SetInParent()
    return message


_KIND = operator.methodcaller("WhichOneof", "kind")


def batch_segments(
    operations: Sequence[pb.Operation],
) -> tuple[int, list[tuple[str | None, int]]]:
    """What a server needs to know of a batch before running it: the operations it stands for
    (each entry, plus every lane operation of a burst) and its entries as segments of one
    kind, each ``(kind, end)`` (its first entry is the previous one's end; a kind is a
    ``pb.Operation.kind`` field name, or None for an entry with none set)."""
    kinds: list[str | None] = list(map(_KIND, operations))
    size = len(kinds)
    if "burst" in kinds:
        size += sum(
            len(lane.operations)
            for message, kind in zip(operations, kinds, strict=True)
            if kind == "burst"
            for lane in message.burst.lanes
        )
    segments, end = [], 0
    for kind, group in itertools.groupby(kinds):
        end += sum(1 for _ in group)
        segments.append((kind, end))
    return size, segments


# -- results ------------------------------------------------------------------------------


def memtype_fields(memtype: EptMemtype) -> tuple[pb.MemoryType.ValueType, bool]:
    return _MEMTYPES[memtype.type], memtype.ipat


def mapping_message(place: Mapping | StaleLeaf, memtype: EptMemtype, into: pb.Mapping) -> None:
    """Fill ``into``: a leaf at ``place`` (its first byte and level) with ``memtype``."""
    into.base_gpa = place.base_gpa
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
            _gpa_range(rng, summary.requested.add())
        for ticket in zap.tickets[:MAX_LISTED_RANGES]:
            _gpa_range(ticket.range, summary.queued.add())
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
    if result.rejected is not None:
        message.rejected = trimmed(result.rejected)
    if result.lookup is not None:
        found, lookup = result.lookup, message.lookup
        lookup.zapped, lookup.mmio = found.zapped, found.mmio
        lookup.recalc_pending = found.recalc_pending
        if found.mapping is not None:
            mapping_message(found.mapping, found.mapping.memtype, lookup.mapping)
        lookup.SetInParent()
    if result.vm_counters is not None:
        counters_message(result.vm_counters, message.vm_counters)
        message.vm_counters.SetInParent()
    if result.vcpu_state is not None:
        state = result.vcpu_state
        message.vcpu_state.cr0, message.vcpu_state.pat = state.cr0, state.pat
        for entry in state.mtrrs:
            message.vcpu_state.mtrrs.add(msr=entry.msr, value=entry.value)
    if result.staleness is not None:
        stale_message(result.staleness, message.staleness)
    return message


def _gpa_range(rng: GfnRange, into: pb.GpaRange) -> None:
    # KVM's ranges are u64 gfns: their byte addresses wrap like KVM's arithmetic does.
    into.start_gpa = (rng.start << PAGE_SHIFT) & U64_MASK
    into.end_gpa = (rng.end << PAGE_SHIFT) & U64_MASK


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


#: EventResult fields that may hold text, ranges or lists: a result setting none of them is
#: "light", its message at most LIGHT_RESULT_BYTES (a test builds the largest light result and
#: checks that every EventResult field is classified).
HEAVY_FIELDS = ("gp", "zap", "strategy_failure", "rejected", "vcpu_state", "staleness")
LIGHT_RESULT_BYTES = 1024
#: At least the size of a result's lane position (two uint32 and their tags).
LANE_POSITION_BYTES = 16


def fill_result(
    entry: int, result: EventResult | Refused | MtrremuError, message: pb.OperationResult
) -> int:
    """Fill ``message`` (in place: it may already sit in a response) with the result of the
    operation at batch entry ``entry``. Returns a bound of its size: LIGHT_RESULT_BYTES for a
    light result (measuring costs as much as converting), else its exact size."""
    message.entry = entry
    if isinstance(result, EventResult):
        outcome_message(result, message.outcome)
        if (  # HEAVY_FIELDS, spelt out: this runs for every result of a batch
            result.gp is None
            and result.zap is None
            and result.strategy_failure is None
            and result.rejected is None
            and result.vcpu_state is None
            and result.staleness is None
        ):
            return LIGHT_RESULT_BYTES
    else:
        error_message(result, message.error)
    return message.ByteSize()


def _bare_test() -> Callable[[object], bool]:
    """``is_bare``, compiled from :class:`EventResult`'s fields (as :func:`_compiled` compiles
    conversions from the operation table): every field but ``op`` at its default. It runs for
    every result of a batch, so it reads each field directly."""
    tests = ["type(r) is EventResult"]
    for spec in dataclasses.fields(EventResult):
        if spec.name != "op":
            # Defaults are None or False (a factory default would have no identity to test).
            assert spec.default in (None, False), spec.name
            tests.append(f"r.{spec.name} is {spec.default!r}")
    test: Callable[[object], bool] = eval(
        f"lambda r: {' and '.join(tests)}", {"EventResult": EventResult}
    )
    return test


#: Whether a result is an event's and holds nothing but its completion (no counts, no value,
#: nothing zapped): most MTRR writes. Its message is :class:`BareResults`' piece.
is_bare = _bare_test()


class BareResults:
    """Ready-made messages for runs of bare results (:data:`is_bare`), the most common result
    of a batch: per batch entry, an ``ExecuteResponse`` holding that entry's result as
    :func:`fill_result` fills it, serialized. Serialized messages concatenated parse as their
    merge, and merging appends repeated fields, so a run's pieces joined into a serialized
    response add the run's results in order, with no message built per result.

    Pieces are made on first use, up to the largest entry asked for (the server's batch limit
    bounds it: about 40 bytes an entry)."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._lock = threading.Lock()

    def run(self, first: int, end: int) -> bytes:
        """The pieces of entries ``[first, end)``, joined."""
        if len(self._pieces) < end:
            with self._lock:
                bare = EventResult(ReadCounters())
                while len(self._pieces) < end:
                    response = pb.ExecuteResponse()
                    fill_result(len(self._pieces), bare, response.results.add())
                    self._pieces.append(response.SerializeToString())
        return b"".join(self._pieces[first:end])


def burst_results(entry: int, result: BurstResult) -> Iterator[tuple[pb.OperationResult, int]]:
    """The results of the burst at batch entry ``entry``: one per lane operation, lane by lane,
    each with its lane position and a bound of its size (as :func:`fill_result`'s)."""
    for vcpu, lane_results in result.lanes.items():
        for index, one in enumerate(lane_results):
            message = pb.OperationResult()
            message.lane.vcpu, message.lane.index = vcpu, index
            yield message, fill_result(entry, one, message) + LANE_POSITION_BYTES


def stale_message(answer: StalenessAnswer, into: pb.StalenessOutcome) -> None:
    """Fill ``into`` with the oracle's answer."""
    log = answer.tracking
    into.quiescent = answer.quiescent
    tracking = into.tracking
    for name in STALENESS_COUNTS:
        setattr(tracking, name, getattr(log, name))
    for gap, count in log.excused.items():
        tracking.excused[gap] = count
    tracking.first_stale_event = trimmed(log.first_stale_event)
    report = answer.report
    if report is None:
        return
    into.stale_leaves = report.count
    for leaf in report.examples:
        example = into.examples.add()
        mapping_message(leaf, leaf.have, example.have)
        if leaf.want is not None and not leaf.mixed:
            mapping_message(leaf, leaf.want, example.want)


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
