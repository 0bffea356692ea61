"""The ``mtrremu.v1.EmulatorService`` servicer: messages in, core calls, messages out.

No emulation happens here. Every method translates its request (:mod:`mtrremu.rpc.convert`),
calls the core, and maps domain errors to statuses (:mod:`mtrremu.rpc.status`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, cast

import grpc

from mtrremu.core.burst import execute_one
from mtrremu.core.errors import InvalidArgument, MtrremuError, ResourceExhausted
from mtrremu.core.events import EventResult, Init, Reset
from mtrremu.core.units import PAGE_SHIFT
from mtrremu.rpc import convert
from mtrremu.rpc.status import abort
from mtrremu.server.limits import Entry, VmTable
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_RUNS_PER_MESSAGE = 4096
MAX_RUNS_PER_MESSAGE = 65536
#: Bytes a VM's description may grow by after creation (leaf and DMA counts, as varints).
LISTING_HEADROOM = 64


class _WithOutcome(Protocol):
    @property
    def outcome(self) -> pb.EventOutcome: ...


R = TypeVar("R", bound=_WithOutcome)


def _answer(response: R, result: EventResult) -> R:
    """``response`` with ``result`` filled in as its outcome (built in place, not copied)."""
    convert.outcome_message(result, response.outcome)
    return response


def _translated(method: F) -> F:
    """Map domain errors raised by a unary method to their status."""

    @functools.wraps(method)
    def wrapper(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except MtrremuError as error:
            abort(context, error)

    return cast(F, wrapper)


def _translated_stream(method: F) -> F:
    """The same for a method returning a response iterator."""

    @functools.wraps(method)
    def wrapper(self: Servicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except MtrremuError as error:
            abort(context, error)

    return cast(F, wrapper)


class Servicer(pb_grpc.EmulatorServiceServicer):
    """Holds the server's VMs; thread-safe (the core serialises per vCPU and per EPT)."""

    def __init__(self, table: VmTable) -> None:
        self.table = table

    # -- VMs ---------------------------------------------------------------------------

    @_translated
    def CreateVm(
        self, request: pb.CreateVmRequest, context: grpc.ServicerContext
    ) -> pb.CreateVmResponse:
        config = convert.vm_config(request.config)
        limit = self.table.limits.max_message_bytes
        answers: list[pb.CreateVmResponse] = []

        def fits(entry: Entry, others: Sequence[Entry]) -> bool:
            answers.append(pb.CreateVmResponse(vm=convert.vm_message(entry.vm, entry.options)))
            # ListVms must stay sendable too; the headroom covers counts that grow later.
            listed = sum(convert.vm_message(e.vm, e.options).ByteSize() for e in others)
            grown = (len(others) + 1) * LISTING_HEADROOM
            return answers[0].ByteSize() + listed + grown <= limit

        self.table.create(config, request.strategy, request.strategy_options, fits)
        return answers[0]

    @_translated
    def GetVm(self, request: pb.GetVmRequest, context: grpc.ServicerContext) -> pb.GetVmResponse:
        entry = self.table.get(request.vm_id)
        return pb.GetVmResponse(vm=convert.vm_message(entry.vm, entry.options))

    @_translated
    def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.ServicerContext
    ) -> pb.ListVmsResponse:
        return pb.ListVmsResponse(
            vms=[convert.vm_message(entry.vm, entry.options) for entry in self.table.all()]
        )

    @_translated
    def DeleteVm(
        self, request: pb.DeleteVmRequest, context: grpc.ServicerContext
    ) -> pb.DeleteVmResponse:
        self.table.delete(request.vm_id)
        return pb.DeleteVmResponse()

    @_translated
    def AttachDmaDevice(
        self, request: pb.AttachDmaDeviceRequest, context: grpc.ServicerContext
    ) -> pb.AttachDmaDeviceResponse:
        result = self.table.vm(request.vm_id).attach_dma()
        return _answer(pb.AttachDmaDeviceResponse(), result)

    @_translated
    def DetachDmaDevice(
        self, request: pb.DetachDmaDeviceRequest, context: grpc.ServicerContext
    ) -> pb.DetachDmaDeviceResponse:
        result = self.table.vm(request.vm_id).detach_dma()
        return _answer(pb.DetachDmaDeviceResponse(), result)

    # -- per-vCPU operations -------------------------------------------------------------

    @_translated
    def WriteMsr(
        self, request: pb.WriteMsrRequest, context: grpc.ServicerContext
    ) -> pb.WriteMsrResponse:
        result = self.table.vm(request.vm_id).apply(convert.write_msr(request.operation))
        return _answer(pb.WriteMsrResponse(), result)

    @_translated
    def ReadMsr(
        self, request: pb.ReadMsrRequest, context: grpc.ServicerContext
    ) -> pb.ReadMsrResponse:
        result = self.table.vm(request.vm_id).apply(convert.read_msr(request.operation))
        return _answer(pb.ReadMsrResponse(), result)

    @_translated
    def WriteCr0(
        self, request: pb.WriteCr0Request, context: grpc.ServicerContext
    ) -> pb.WriteCr0Response:
        result = self.table.vm(request.vm_id).apply(convert.write_cr0(request.operation))
        return _answer(pb.WriteCr0Response(), result)

    @_translated
    def ReadCr0(
        self, request: pb.ReadCr0Request, context: grpc.ServicerContext
    ) -> pb.ReadCr0Response:
        return pb.ReadCr0Response(value=self.table.vm(request.vm_id).vcpu(request.vcpu).cr0)

    @_translated
    def ResetVcpu(
        self, request: pb.ResetVcpuRequest, context: grpc.ServicerContext
    ) -> pb.ResetVcpuResponse:
        result = self.table.vm(request.vm_id).apply(Reset(request.operation.vcpu))
        return _answer(pb.ResetVcpuResponse(), result)

    @_translated
    def InitVcpu(
        self, request: pb.InitVcpuRequest, context: grpc.ServicerContext
    ) -> pb.InitVcpuResponse:
        result = self.table.vm(request.vm_id).apply(Init(request.operation.vcpu))
        return _answer(pb.InitVcpuResponse(), result)

    @_translated
    def AccessGpa(
        self, request: pb.AccessGpaRequest, context: grpc.ServicerContext
    ) -> pb.AccessGpaResponse:
        result = self.table.vm(request.vm_id).apply(convert.access(request.operation))
        return _answer(pb.AccessGpaResponse(), result)

    @_translated
    def FaultRange(
        self, request: pb.FaultRangeRequest, context: grpc.ServicerContext
    ) -> pb.FaultRangeResponse:
        result = self.table.vm(request.vm_id).apply(convert.fault_range(request.operation))
        return _answer(pb.FaultRangeResponse(), result)

    # -- the EPT and observability ---------------------------------------------------------

    @_translated
    def LookupGpa(
        self, request: pb.LookupGpaRequest, context: grpc.ServicerContext
    ) -> pb.LookupGpaResponse:
        entry = self.table.vm(request.vm_id).lookup(request.gpa >> PAGE_SHIFT)
        response = pb.LookupGpaResponse(zapped=entry.zapped, mmio=entry.mmio)
        if entry.present:
            convert.mapping_message(entry, entry.memtype, response.mapping)
        return response

    @_translated_stream
    def DumpLeaves(
        self, request: pb.DumpLeavesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DumpLeavesResponse]:
        per_message = request.runs_per_message or DEFAULT_RUNS_PER_MESSAGE
        if per_message > MAX_RUNS_PER_MESSAGE:
            raise InvalidArgument(f"runs_per_message is at most {MAX_RUNS_PER_MESSAGE}")
        yield from convert.leaf_runs(self.table.vm(request.vm_id), per_message)

    @_translated
    def GetCounters(
        self, request: pb.GetCountersRequest, context: grpc.ServicerContext
    ) -> pb.GetCountersResponse:
        counters = self.table.vm(request.vm_id).counters_snapshot()
        return pb.GetCountersResponse(counters=convert.counters_message(counters))

    @_translated
    def CheckStaleness(
        self, request: pb.CheckStalenessRequest, context: grpc.ServicerContext
    ) -> pb.CheckStalenessResponse:
        vm = self.table.vm(request.vm_id)
        if request.at_quiescence:
            return convert.stale_message(vm.stale_at_quiescence(), vm.staleness)
        response = convert.stale_message(vm.stale(request.vcpu), vm.staleness)
        response.quiescent = vm.quiescent()
        return response

    @_translated
    def ListStrategies(
        self, request: pb.ListStrategiesRequest, context: grpc.ServicerContext
    ) -> pb.ListStrategiesResponse:
        return pb.ListStrategiesResponse(
            strategies=[
                pb.Strategy(
                    name=s.name,
                    description=s.spec.description,
                    profile=convert.profile_message(s.spec.profile),
                    options=dict(s.spec.options),
                    plugin=s.plugin,
                    distribution=s.distribution,
                    version=s.version,
                )
                for s in self.table.manager.strategies()
            ]
        )

    # -- the high-rate path ----------------------------------------------------------------

    @_translated_stream
    def Execute(
        self, request_iterator: Iterator[pb.ExecuteRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteResponse]:
        """Batches in order; a refused operation is an error result and the batch goes on. An
        unknown VM or an oversized batch ends the stream with its status."""
        limit = self.table.limits.max_batch_operations
        for request in request_iterator:
            vm = self.table.vm(request.vm_id)
            size = convert.batch_size(request.operations)
            if size > limit:
                raise ResourceExhausted(
                    f"batch {request.batch_id} holds {size} operations; the limit is {limit}"
                )
            response = pb.ExecuteResponse(batch_id=request.batch_id)
            results = response.results
            for op in request.operations:
                out = results.add()
                try:
                    item = convert.operation(op)
                except MtrremuError as error:
                    convert.error_message(error, out.error)
                    continue
                convert.result_message(execute_one(vm, item), out)
            yield response
