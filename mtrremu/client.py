"""A thin, typed Python client for the ``mtrremu.v1`` API.

Calls return the API's messages (typed by the generated stubs); a failed call raises the same
domain error the server mapped (:mod:`mtrremu.core.errors`), e.g. ``RejectedHostWrite`` for a
refused host write. A guest #GP is not an error: ``outcome.guest_fault.reason`` is set.

::

    with Client("127.0.0.1:50051") as client:
        vm = client.create_vm(VmConfig(vcpus=2, noncoherent_dma=1), "fine-grained")
        outcome = vm.write_cr0(0, 0x11)
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtrremu.core.config import VmConfig
from mtrremu.core.counters import Counters
from mtrremu.core.events import (
    Access,
    AttachDma,
    CheckStaleness,
    DetachDma,
    FaultRange,
    Init,
    Item,
    LookupGpa,
    MsrValue,
    Op,
    ReadCounters,
    ReadMsr,
    ReadVcpuState,
    Reset,
    WriteCr0,
    WriteMsr,
    WriteMsrs,
)
from mtrremu.core.operations import BY_TYPE
from mtrremu.rpc import convert
from mtrremu.rpc.status import raise_domain
from mtrremu.rpc.transport import DEFAULT_MAX_MESSAGE_BYTES, Tls, client_options
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc

T = TypeVar("T")
DEFAULT_BATCH = 1000
#: ImportVm sends a snapshot in chunks of this size.
SNAPSHOT_CHUNK_BYTES = 1 << 20


def _call(method: Callable[[], T]) -> T:
    try:
        return method()
    except grpc.RpcError as error:
        raise_domain(error)


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Call details with metadata added (gRPC's own are not constructible)."""


class _Token(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _Details:
        metadata = [*(details.metadata or ()), self._pair]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class Client:
    """A connection to one server (``host:port`` or ``unix:/path``)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        tls: Tls | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = client_options(DEFAULT_MAX_MESSAGE_BYTES)
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.peer_ca,
                private_key=tls.private_key,
                certificate_chain=tls.cert_chain,
            )
            self.channel = grpc.secure_channel(target, credentials, options=options)
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, _Token(token))
        self.stub = pb_grpc.EmulatorServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (a server just started may need a moment)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def health(self, service: str = "") -> str:
        """The health status name of ``service`` (``""``: the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def create_vm(
        self,
        config: VmConfig | None = None,
        strategy: str = "fine-grained",
        options: Mapping[str, str] | None = None,
    ) -> RemoteVm:
        request = pb.CreateVmRequest(
            config=convert.vm_config_message(config or VmConfig()),
            strategy=strategy,
            strategy_options=dict(options or {}),
        )
        response = _call(lambda: self.stub.CreateVm(request, timeout=self.timeout))
        return RemoteVm(self, response.vm.vm_id)

    def vm(self, vm_id: str) -> RemoteVm:
        """A handle on an existing VM (not checked until used)."""
        return RemoteVm(self, vm_id)

    def list_vms(self) -> list[pb.Vm]:
        """Every VM (without memslots), oldest first, fetched page by page."""
        vms: list[pb.Vm] = []
        token = ""
        while True:
            request = pb.ListVmsRequest(page_token=token)
            page: pb.ListVmsResponse = _call(
                functools.partial(self.stub.ListVms, request, timeout=self.timeout)
            )
            vms.extend(page.vms)
            token = page.next_page_token
            if not token:
                return vms

    def import_vm(self, snapshot: bytes | BinaryIO) -> RemoteVm:
        """A new VM from a snapshot (the bytes of a snapshot file, or a binary file to read
        it from, sent in chunks); its state is the snapshot's, its id new."""
        source = io.BytesIO(snapshot) if isinstance(snapshot, bytes) else snapshot

        def chunks() -> Iterator[pb.ImportVmRequest]:
            while chunk := source.read(SNAPSHOT_CHUNK_BYTES):
                yield pb.ImportVmRequest(data=chunk)

        response = _call(lambda: self.stub.ImportVm(chunks(), timeout=self.timeout))
        return RemoteVm(self, response.vm.vm_id)

    def list_strategies(self) -> list[pb.Strategy]:
        request = pb.ListStrategiesRequest()
        return list(
            _call(lambda: self.stub.ListStrategies(request, timeout=self.timeout)).strategies
        )


class RemoteVm:
    """One VM on a server. Every method is one call (``execute`` streams batches)."""

    def __init__(self, client: Client, vm_id: str) -> None:
        self.client = client
        self.vm_id = vm_id
        self._stub = client.stub
        self._timeout = client.timeout

    def describe(self) -> pb.Vm:
        request = pb.GetVmRequest(vm_id=self.vm_id)
        return _call(lambda: self._stub.GetVm(request, timeout=self._timeout)).vm

    def delete(self) -> None:
        request = pb.DeleteVmRequest(vm_id=self.vm_id)
        _call(lambda: self._stub.DeleteVm(request, timeout=self._timeout))

    def export(self) -> bytes:
        """The VM's snapshot file (docs/snapshots.md)."""
        buffer = io.BytesIO()
        self.export_to(buffer)
        return buffer.getvalue()

    def export_to(self, out: BinaryIO) -> int:
        """Write the VM's snapshot file to ``out``; returns its size in bytes."""
        request = pb.ExportVmRequest(vm_id=self.vm_id)
        written = 0
        try:
            for response in self._stub.ExportVm(request, timeout=self._timeout):
                written += out.write(response.data)
        except grpc.RpcError as error:
            raise_domain(error)
        return written

    # -- operations ---------------------------------------------------------------------

    def apply(self, op: Op) -> pb.EventOutcome:
        """Run any operation through its unary RPC (see :mod:`mtrremu.core.operations`)."""
        kind = BY_TYPE[type(op)]
        request = getattr(pb, f"{kind.rpc}Request")(vm_id=self.vm_id)
        convert.fill_operation(op, request.operation)
        request.operation.SetInParent()
        call = getattr(self._stub, kind.rpc)
        outcome: pb.EventOutcome = _call(lambda: call(request, timeout=self._timeout)).outcome
        return outcome

    def write_msr(self, vcpu: int, msr: int, value: int, *, host: bool = False) -> pb.EventOutcome:
        return self.apply(WriteMsr(vcpu, msr, value, host))

    def write_msrs(self, vcpu: int, values: Iterable[tuple[int, int]]) -> pb.EventOutcome:
        """KVM_SET_MSRS: ``(msr, value)`` pairs in order; ``value`` says how many were written."""
        return self.apply(WriteMsrs(vcpu, tuple(MsrValue(m, v) for m, v in values)))

    def read_msr(self, vcpu: int, msr: int, *, host: bool = False) -> pb.EventOutcome:
        return self.apply(ReadMsr(vcpu, msr, host))

    def write_cr0(self, vcpu: int, value: int, *, host: bool = False) -> pb.EventOutcome:
        return self.apply(WriteCr0(vcpu, value, host))

    def reset(self, vcpu: int) -> pb.EventOutcome:
        return self.apply(Reset(vcpu))

    def init(self, vcpu: int) -> pb.EventOutcome:
        return self.apply(Init(vcpu))

    def access(self, vcpu: int, gpa: int) -> pb.EventOutcome:
        return self.apply(Access(vcpu, gpa))

    def fault_range(self, vcpu: int, start_gpa: int, end_gpa: int) -> pb.EventOutcome:
        return self.apply(FaultRange(vcpu, start_gpa, end_gpa))

    def vcpu_state(self, vcpu: int) -> pb.VcpuState:
        return self.apply(ReadVcpuState(vcpu)).vcpu_state

    def attach_dma(self) -> pb.EventOutcome:
        return self.apply(AttachDma())

    def detach_dma(self) -> pb.EventOutcome:
        return self.apply(DetachDma())

    def lookup(self, gpa: int) -> pb.LookupOutcome:
        return self.apply(LookupGpa(gpa)).lookup

    def counters(self) -> Counters:
        return convert.counters(self.apply(ReadCounters()).vm_counters)

    def staleness(self, vcpu: int = 0, *, at_quiescence: bool = False) -> pb.StalenessOutcome:
        return self.apply(CheckStaleness(vcpu, at_quiescence)).staleness

    def dump_leaves(self, runs_per_message: int = 0) -> Iterator[pb.LeafRun]:
        request = pb.DumpLeavesRequest(vm_id=self.vm_id, runs_per_message=runs_per_message)
        try:
            for response in self._stub.DumpLeaves(request, timeout=self._timeout):
                yield from response.runs
        except grpc.RpcError as error:
            raise_domain(error)

    # -- the high-rate path ----------------------------------------------------------------

    def execute(
        self, items: Iterable[Item], batch_size: int = DEFAULT_BATCH
    ) -> list[pb.OperationResult]:
        """Replay operations and bursts through the batch stream: every result in order, each
        with the index of its item (``entry``, counted across batches) and, for a burst's
        operations, its lane (a refused item or operation carries ``error``)."""
        return list(
            self.execute_messages((convert.operation_message(i) for i in items), batch_size)
        )

    def execute_messages(
        self, operations: Iterable[pb.Operation], batch_size: int = DEFAULT_BATCH
    ) -> Iterator[pb.OperationResult]:
        """The same for operations already in message form."""

        def batches() -> Iterator[pb.ExecuteRequest]:
            ops = iter(operations)
            for batch_id in itertools.count():
                chunk = list(itertools.islice(ops, batch_size))
                if not chunk:
                    return
                yield pb.ExecuteRequest(vm_id=self.vm_id, operations=chunk, batch_id=batch_id)

        responses = self._stub.Execute(batches())
        try:
            for response in responses:
                for result in response.results:
                    result.entry += response.batch_id * batch_size
                    yield result
        except grpc.RpcError as error:
            raise_domain(error)
