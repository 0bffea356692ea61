"""The ``mtrremu.v1.EmulatorService`` handlers: messages in, core calls, messages out.

No emulation happens here. Every handler translates its request (:mod:`mtrremu.rpc.convert`),
calls the core, and maps domain errors to statuses (:mod:`mtrremu.rpc.status`). The handlers of
the operations (one unary RPC each, plus their place in ``Execute``) come from the table in
:mod:`mtrremu.core.operations`; :func:`service` registers them all under the service's name.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from mtrremu.core.config import VmConfig
from mtrremu.core.errors import (
    InvalidArgument,
    MtrremuError,
    PermissionDenied,
    ResourceExhausted,
    UnknownVm,
)
from mtrremu.core.events import BurstResult, ItemResult, WriteMsr
from mtrremu.core.operations import OPERATIONS, OperationKind
from mtrremu.core.vm_state import VmState, capture
from mtrremu.plugin.manager import accepted_options
from mtrremu.rpc import convert
from mtrremu.rpc.status import abort
from mtrremu.rpc.transport import REPLY_CHUNK_BYTES, REPLY_LIMIT_BYTES
from mtrremu.server.clients import DEFAULT_CLIENT, Clients
from mtrremu.server.fairness import Stream, StreamGuard
from mtrremu.server.limits import Entry, VmTable
from mtrremu.snapshot import read_snapshot, write_snapshot
from mtrremu.v1 import emulator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EmulatorService"].full_name
#: What a result adds to a response besides its own size: its tag and length prefix.
RESULT_OVERHEAD_BYTES = 5
#: Snapshots in transit stay in memory up to this size, then go to a temporary file.
SPOOL_BYTES = 8 << 20
#: Single-MSR writes run at most this many at a time: what a run holds dies young (before
#: the cycle collector's first generation fills and moves it on).
RUN_WRITES = 128
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_RUNS_PER_MESSAGE = 4096
MAX_RUNS_PER_MESSAGE = 65536

Unary = Callable[[Any, grpc.ServicerContext], Message]
#: The answers that describe a VM just created.
Answer = TypeVar("Answer", pb.CreateVmResponse, pb.ImportVmResponse)
#: A streaming handler; a response is a message, or already serialized (Execute's).
Streaming = Callable[[Any, grpc.ServicerContext], Iterator[Message | bytes]]


class Servicer:
    """Holds the server's VMs; thread-safe (the core serialises per vCPU and per EPT)."""

    def __init__(
        self,
        table: VmTable,
        snapshot_key: bytes | None = None,
        clients: Clients | None = None,
    ) -> None:
        self.table = table
        #: Snapshots are signed with it (HMAC-SHA-256) and must carry its signature.
        self.snapshot_key = snapshot_key
        #: The clients and their tokens (the token interceptor admitted the call already).
        self.clients = clients

    def owner(self, context: grpc.ServicerContext) -> str:
        """The client making the call: the one its token names, or the only one."""
        if self.clients is None:
            return DEFAULT_CLIENT
        client = self.clients.client_of(context.invocation_metadata() or ())
        if client is None:  # the token interceptor lets no such call through
            raise PermissionDenied("the call carries no client's token")
        return client

    # -- VMs ---------------------------------------------------------------------------

    def CreateVm(
        self, request: pb.CreateVmRequest, context: grpc.ServicerContext
    ) -> pb.CreateVmResponse:
        config = convert.vm_config(request.config)
        return self._created(
            pb.CreateVmResponse, context, config, request.strategy, request.strategy_options
        )

    def GetVm(self, request: pb.GetVmRequest, context: grpc.ServicerContext) -> pb.GetVmResponse:
        entry = self.table.get(request.vm_id, self.owner(context))
        return pb.GetVmResponse(vm=convert.vm_message(entry.vm, entry.options))

    def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.ServicerContext
    ) -> pb.ListVmsResponse:
        token = request.page_token or "0"
        if not token.isdigit():
            raise InvalidArgument(f"page_token {token!r} is not one ListVms gave")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = pb.ListVmsResponse()
        last = int(token)
        for entry in self.table.created_after(last, self.owner(context)):
            summary = convert.vm_message(entry.vm, entry.options, memslots=False)
            # A page holds at least one VM (its summary is smaller than the GetVm answer
            # CreateVm checked) and otherwise stays under the chunk size.
            full = len(page.vms) == size or (
                page.vms and page.ByteSize() + summary.ByteSize() + 16 > REPLY_CHUNK_BYTES
            )
            if full:
                page.next_page_token = str(last)
                break
            page.vms.append(summary)
            last = entry.serial
        return page

    def DeleteVm(
        self, request: pb.DeleteVmRequest, context: grpc.ServicerContext
    ) -> pb.DeleteVmResponse:
        self.table.delete(request.vm_id, self.owner(context))
        return pb.DeleteVmResponse()

    def ListStrategies(
        self, request: pb.ListStrategiesRequest, context: grpc.ServicerContext
    ) -> pb.ListStrategiesResponse:
        return pb.ListStrategiesResponse(
            strategies=[
                pb.Strategy(
                    name=s.name,
                    description=s.spec.description,
                    profile=convert.profile_message(s.spec.profile),
                    options=accepted_options(s),
                    plugin=s.plugin,
                    distribution=s.distribution,
                    version=s.version,
                )
                for s in self.table.manager.strategies()
            ]
        )

    def DumpLeaves(
        self, request: pb.DumpLeavesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DumpLeavesResponse]:
        per_message = request.runs_per_message or DEFAULT_RUNS_PER_MESSAGE
        if per_message > MAX_RUNS_PER_MESSAGE:
            raise InvalidArgument(f"runs_per_message is at most {MAX_RUNS_PER_MESSAGE}")
        yield from convert.leaf_runs(self.table.vm(request.vm_id, self.owner(context)), per_message)

    def ExportVm(
        self, request: pb.ExportVmRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportVmResponse]:
        entry = self.table.get(request.vm_id, self.owner(context))
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
            state = capture(entry.vm, entry.options, entry.owner)
            write_snapshot(state, spool, self.snapshot_key)
            del state
            spool.seek(0)
            while chunk := spool.read(REPLY_CHUNK_BYTES):
                yield pb.ExportVmResponse(data=chunk)

    def ImportVm(
        self, request_iterator: Iterator[pb.ImportVmRequest], context: grpc.ServicerContext
    ) -> pb.ImportVmResponse:
        limit = self.table.limits.max_snapshot_bytes
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
            for request in request_iterator:
                if spool.tell() + len(request.data) > limit:
                    raise ResourceExhausted(
                        f"the snapshot exceeds this server's limit of {limit} bytes"
                    )
                spool.write(request.data)
            state = read_snapshot(spool, self.snapshot_key, admit=self.table.admit)
        return self._created(
            pb.ImportVmResponse, context, state.config, state.strategy, state.options, state=state
        )

    def _created(
        self,
        response_type: type[Answer],
        context: grpc.ServicerContext,
        config: VmConfig,
        strategy: str,
        options: Mapping[str, str],
        *,
        state: VmState | None = None,
    ) -> Answer:
        """A new VM of the calling client (see :meth:`VmTable.create`), described by a
        ``response_type``; refused (nothing created) if that answer would exceed one reply."""
        answers: list[Answer] = []

        def fits(entry: Entry) -> bool:
            answers.append(response_type(vm=convert.vm_message(entry.vm, entry.options)))
            return answers[0].ByteSize() <= REPLY_LIMIT_BYTES

        owner = self.owner(context)
        self.table.create(config, strategy, options, fits, state=state, owner=owner)
        return answers[0]

    # -- operations ----------------------------------------------------------------------

    def operation(self, kind: OperationKind) -> Unary:
        """The unary handler of one kind of operation: ``<Rpc>Request`` in, outcome out."""
        response_type = getattr(pb, f"{kind.rpc}Response")

        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            vm = self.table.vm(request.vm_id, self.owner(context))
            result = vm.apply(convert.operation_of(kind, request.operation))
            response: Message = response_type()
            convert.outcome_message(result, getattr(response, "outcome"))  # noqa: B009
            return response

        return handle

    # -- the high-rate path ----------------------------------------------------------------

    def Execute(
        self, request_iterator: Iterator[pb.ExecuteRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Batches in order, each answered by responses of at most REPLY_CHUNK_BYTES (built
        serialized, see :class:`_Replies`); a refused operation is an error result and the
        batch goes on. An unknown VM or an oversized batch ends the stream with its status. A
        call that ends (cancelled, deadline, the client gone) applies no operation after the
        one running; a VM deleted meanwhile ends the stream with VM_NOT_FOUND before its next
        operation. Consecutive single-MSR writes (most of a replay) run up to RUN_WRITES at a
        time (:meth:`Vm.write_msr_run`); other operations one by one."""
        limit = self.table.limits.max_batch_operations
        owner = self.owner(context)
        ended = threading.Event()
        context.add_callback(ended.set)
        for request in request_iterator:
            vm = self.table.vm(request.vm_id, owner)
            operations = request.operations
            size, segments = convert.batch_segments(operations)
            if size > limit:
                raise ResourceExhausted(
                    f"batch {request.batch_id} holds {size} operations; the limit is {limit}"
                )
            replies = _Replies(request.batch_id)
            entry = 0
            for kind, end in segments:
                while entry < end:
                    if ended.is_set():
                        return
                    if vm.closed:
                        raise UnknownVm(request.vm_id)
                    run: list[WriteMsr] = []
                    if kind == "write_msr":  # (a malformed first write gives an empty run)
                        run = convert.msr_write_run(operations, entry, min(end, entry + RUN_WRITES))
                    if run:
                        outcomes = vm.write_msr_run(run, stop=ended)
                        replies.add(entry, outcomes)
                        entry += len(outcomes)
                    else:
                        result: ItemResult | MtrremuError
                        try:
                            result = convert.execute(vm, operations[entry], kind)
                        except MtrremuError as error:  # a malformed operation: nothing ran
                            result = error
                        replies.add(entry, (result,))
                        entry += 1
                    yield from replies.ready
                    replies.ready.clear()
            yield replies.last()


class _Replies:
    """The responses of one batch as its results come, each serialized as it closes: results
    are counted at a bound of their size, and a response is closed (into :attr:`ready`)
    before a result would take it past REPLY_CHUNK_BYTES, that result moving on to the next.

    A response is built as serialized pieces (serialized messages concatenated parse as
    their merge, and merging appends repeated fields): bare results (most MTRR writes) are
    ready-made pieces (:class:`convert.BareResults`), joined without building a message per
    result; the others are filled into a message, serialized when a bare one follows."""

    def __init__(self, batch_id: int) -> None:
        self.batch_id = batch_id
        #: Responses closed, serialized, to be sent in this order.
        self.ready: list[bytes] = []
        self._header = pb.ExecuteResponse(batch_id=batch_id).SerializeToString()
        self._pieces = [self._header]
        #: Results other than bare ones not serialized yet.
        self._full = pb.ExecuteResponse()
        self._used = 0
        #: The entries ``[first, end)`` of the run of bare results not joined yet (first -1:
        #: none).
        self._bare = (-1, -1)

    def add(self, first: int, outcomes: Sequence[ItemResult | MtrremuError | None]) -> None:
        """The results of entries ``first``, ``first + 1``, ... (``None``: a bare result)."""
        if outcomes.count(None) == len(outcomes):  # the usual run: all bare
            self._add_bare(first, len(outcomes))
            return
        for entry, outcome in enumerate(outcomes, first):
            if outcome is None or convert.is_bare(outcome):
                self._add_bare(entry, 1)
            else:
                self._add_full(entry, outcome)

    def last(self) -> bytes:
        """The batch's last response (what was added and is not in :attr:`ready`)."""
        self._flush()
        self._pieces.append(_LAST)
        return b"".join(self._pieces)

    def _add_bare(self, first: int, count: int) -> None:
        """Bare results of entries ``[first, first + count)``."""
        self._flush_full()
        while count:
            fit = (REPLY_CHUNK_BYTES - self._used) // _BARE_COST
            if not fit:
                self._next()
                continue
            taken = min(fit, count)
            if self._bare[0] < 0:
                self._bare = (first, first)
            first += taken
            count -= taken
            self._bare = (self._bare[0], first)
            self._used += taken * _BARE_COST

    def _add_full(self, entry: int, result: ItemResult | MtrremuError) -> None:
        self._flush_bare()
        if isinstance(result, BurstResult):
            for message, size in convert.burst_results(entry, result):
                cost = size + RESULT_OVERHEAD_BYTES
                if self._used and self._used + cost > REPLY_CHUNK_BYTES:
                    self._next()
                self._full.results.append(message)
                self._used += cost
            return
        cost = convert.fill_result(entry, result, self._full.results.add())
        cost += RESULT_OVERHEAD_BYTES
        if self._used and self._used + cost > REPLY_CHUNK_BYTES:
            moved = self._full.results.pop()
            self._next()
            self._full.results.append(moved)
        self._used += cost

    def _next(self) -> None:
        """Close the response being built and start the next."""
        self._flush()
        self.ready.append(b"".join(self._pieces))
        self._pieces = [self._header]
        self._used = 0

    def _flush(self) -> None:
        self._flush_bare()
        self._flush_full()

    def _flush_bare(self) -> None:
        first, end = self._bare
        if first >= 0:
            self._pieces.append(_BARE.run(first, end))
            self._bare = (-1, -1)

    def _flush_full(self) -> None:
        if self._full.results:
            self._pieces.append(self._full.SerializeToString())
            self._full = pb.ExecuteResponse()


_BARE = convert.BareResults()
#: What a bare result counts for in a response.
_BARE_COST = convert.LIGHT_RESULT_BYTES + RESULT_OVERHEAD_BYTES
#: The piece that ends a batch's last response.
_LAST = pb.ExecuteResponse(last=True).SerializeToString()


def _translated(handler: Unary) -> Unary:
    """Map domain errors raised by a unary handler to their status."""

    def wrapper(request: Any, context: grpc.ServicerContext) -> Message:
        try:
            return handler(request, context)
        except MtrremuError as error:
            abort(context, error)

    return wrapper


def _translated_stream(handler: Streaming) -> Streaming:
    """The same for a handler returning a response iterator."""

    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Message | bytes]:
        try:
            yield from handler(request, context)
        except MtrremuError as error:
            abort(context, error)

    return wrapper


def _unary(handler: Unary, rpc: str) -> grpc.RpcMethodHandler[Any, Any]:
    method = pb.DESCRIPTOR.services_by_name["EmulatorService"].methods_by_name[rpc]
    return grpc.unary_unary_rpc_method_handler(
        _translated(handler),
        request_deserializer=getattr(pb, method.input_type.name).FromString,
        response_serializer=getattr(pb, method.output_type.name).SerializeToString,
    )


def _guarded(handler: Streaming, guard: StreamGuard) -> Streaming:
    """A stream within the guard's bounds: admitted or refused at once, kept alive by its
    requests and responses, cancelled by the guard when idle, released when it ends."""

    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Message | bytes]:
        stream = guard.admit(context)
        try:
            if not isinstance(request, Message):
                request = _tracked(request, stream)
            for response in handler(request, context):
                # While gRPC waits for the client to take the response, the stream is idle:
                # a client that stops reading is cancelled like one that stops sending.
                busy, stream.working = stream.working, 0
                stream.touch()
                yield response
                stream.working = busy
                stream.touch()
        except grpc.RpcError:
            if context.is_active():
                raise
            # The call was cancelled (by its client, or by the guard as idle): nothing to say.
        finally:
            guard.release(stream)

    return wrapper


def _guarded_unary(handler: Unary, guard: StreamGuard) -> Unary:
    """A request stream answered once, within the guard's bounds (see :func:`_guarded`)."""

    def wrapper(request: Any, context: grpc.ServicerContext) -> Message:
        stream = guard.admit(context)
        try:
            return handler(_tracked(request, stream), context)
        finally:
            guard.release(stream)

    return wrapper


def _tracked(requests: Iterator[Any], stream: Stream) -> Iterator[Any]:
    """Mark the stream busy from each request's arrival until the next one is asked for."""
    for request in requests:
        stream.working = 1
        stream.touch()
        yield request
        stream.working = 0
        stream.touch()


def service(servicer: Servicer, guard: StreamGuard) -> grpc.GenericRpcHandler[Any, Any]:
    """Every RPC of the service, ready for ``grpc.Server.add_generic_rpc_handlers``."""
    unary: dict[str, Unary] = {
        "CreateVm": servicer.CreateVm,
        "GetVm": servicer.GetVm,
        "ListVms": servicer.ListVms,
        "DeleteVm": servicer.DeleteVm,
        "ListStrategies": servicer.ListStrategies,
    }
    unary |= {kind.rpc: servicer.operation(kind) for kind in OPERATIONS}
    handlers = {rpc: _unary(handler, rpc) for rpc, handler in unary.items()}
    handlers["DumpLeaves"] = grpc.unary_stream_rpc_method_handler(
        _translated_stream(_guarded(servicer.DumpLeaves, guard)),
        request_deserializer=pb.DumpLeavesRequest.FromString,
        response_serializer=pb.DumpLeavesResponse.SerializeToString,
    )
    handlers["ExportVm"] = grpc.unary_stream_rpc_method_handler(
        _translated_stream(_guarded(servicer.ExportVm, guard)),
        request_deserializer=pb.ExportVmRequest.FromString,
        response_serializer=pb.ExportVmResponse.SerializeToString,
    )
    handlers["ImportVm"] = grpc.stream_unary_rpc_method_handler(
        _translated(_guarded_unary(servicer.ImportVm, guard)),
        request_deserializer=pb.ImportVmRequest.FromString,
        response_serializer=pb.ImportVmResponse.SerializeToString,
    )
    handlers["Execute"] = grpc.stream_stream_rpc_method_handler(
        _translated_stream(_guarded(servicer.Execute, guard)),
        request_deserializer=pb.ExecuteRequest.FromString,
        response_serializer=bytes,  # Execute builds its responses serialized
    )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)
