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

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtrremu.core.config import VmConfig
from mtrremu.core.counters import Counters
from mtrremu.core.events import Item
from mtrremu.rpc import convert
from mtrremu.rpc.status import raise_domain
from mtrremu.rpc.transport import DEFAULT_MAX_MESSAGE_BYTES, message_size_options
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc

T = TypeVar("T")
DEFAULT_BATCH = 1000


def _call(method: Callable[[], T]) -> T:
    try:
        return method()
    except grpc.RpcError as error:
        raise_domain(error)


class Client:
    """A connection to one server (``host:port`` or ``unix:/path``)."""

    def __init__(self, target: str, *, timeout: float | None = 60.0) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            target,
            options=message_size_options(DEFAULT_MAX_MESSAGE_BYTES),
        )
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
        return list(_call(lambda: self.stub.ListVms(pb.ListVmsRequest(), timeout=self.timeout)).vms)

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

    # -- operations ---------------------------------------------------------------------

    def write_msr(self, vcpu: int, msr: int, value: int, *, host: bool = False) -> pb.EventOutcome:
        op = pb.WriteMsrOperation(
            vcpu=vcpu, msr=msr, value=value, initiator=convert.initiator_message(host)
        )
        request = pb.WriteMsrRequest(vm_id=self.vm_id, operation=op)
        return _call(lambda: self._stub.WriteMsr(request, timeout=self._timeout)).outcome

    def read_msr(self, vcpu: int, msr: int, *, host: bool = False) -> pb.EventOutcome:
        op = pb.ReadMsrOperation(vcpu=vcpu, msr=msr, initiator=convert.initiator_message(host))
        request = pb.ReadMsrRequest(vm_id=self.vm_id, operation=op)
        return _call(lambda: self._stub.ReadMsr(request, timeout=self._timeout)).outcome

    def write_cr0(self, vcpu: int, value: int, *, host: bool = False) -> pb.EventOutcome:
        op = pb.WriteCr0Operation(vcpu=vcpu, value=value, initiator=convert.initiator_message(host))
        request = pb.WriteCr0Request(vm_id=self.vm_id, operation=op)
        return _call(lambda: self._stub.WriteCr0(request, timeout=self._timeout)).outcome

    def read_cr0(self, vcpu: int) -> int:
        request = pb.ReadCr0Request(vm_id=self.vm_id, vcpu=vcpu)
        return _call(lambda: self._stub.ReadCr0(request, timeout=self._timeout)).value

    def reset(self, vcpu: int) -> pb.EventOutcome:
        request = pb.ResetVcpuRequest(vm_id=self.vm_id, operation=pb.ResetVcpuOperation(vcpu=vcpu))
        return _call(lambda: self._stub.ResetVcpu(request, timeout=self._timeout)).outcome

    def init(self, vcpu: int) -> pb.EventOutcome:
        request = pb.InitVcpuRequest(vm_id=self.vm_id, operation=pb.InitVcpuOperation(vcpu=vcpu))
        return _call(lambda: self._stub.InitVcpu(request, timeout=self._timeout)).outcome

    def access(self, vcpu: int, gpa: int) -> pb.EventOutcome:
        op = pb.AccessGpaOperation(vcpu=vcpu, gpa=gpa)
        request = pb.AccessGpaRequest(vm_id=self.vm_id, operation=op)
        return _call(lambda: self._stub.AccessGpa(request, timeout=self._timeout)).outcome

    def fault_range(self, vcpu: int, start_gpa: int, end_gpa: int) -> pb.EventOutcome:
        op = pb.FaultRangeOperation(vcpu=vcpu, start_gpa=start_gpa, end_gpa=end_gpa)
        request = pb.FaultRangeRequest(vm_id=self.vm_id, operation=op)
        return _call(lambda: self._stub.FaultRange(request, timeout=self._timeout)).outcome

    def attach_dma(self) -> pb.EventOutcome:
        request = pb.AttachDmaDeviceRequest(vm_id=self.vm_id)
        return _call(lambda: self._stub.AttachDmaDevice(request, timeout=self._timeout)).outcome

    def detach_dma(self) -> pb.EventOutcome:
        request = pb.DetachDmaDeviceRequest(vm_id=self.vm_id)
        return _call(lambda: self._stub.DetachDmaDevice(request, timeout=self._timeout)).outcome

    # -- the EPT and observability -----------------------------------------------------------

    def lookup(self, gpa: int) -> pb.LookupGpaResponse:
        request = pb.LookupGpaRequest(vm_id=self.vm_id, gpa=gpa)
        return _call(lambda: self._stub.LookupGpa(request, timeout=self._timeout))

    def dump_leaves(self, runs_per_message: int = 0) -> Iterator[pb.LeafRun]:
        request = pb.DumpLeavesRequest(vm_id=self.vm_id, runs_per_message=runs_per_message)
        responses = _call(lambda: list(self._stub.DumpLeaves(request, timeout=self._timeout)))
        for response in responses:
            yield from response.runs

    def counters(self) -> Counters:
        request = pb.GetCountersRequest(vm_id=self.vm_id)
        response = _call(lambda: self._stub.GetCounters(request, timeout=self._timeout))
        return convert.counters(response.counters)

    def staleness(self, vcpu: int = 0, *, at_quiescence: bool = False) -> pb.CheckStalenessResponse:
        request = pb.CheckStalenessRequest(vm_id=self.vm_id, vcpu=vcpu, at_quiescence=at_quiescence)
        return _call(lambda: self._stub.CheckStaleness(request, timeout=self._timeout))

    # -- the high-rate path ----------------------------------------------------------------

    def execute(
        self, items: Iterable[Item], batch_size: int = DEFAULT_BATCH
    ) -> list[pb.OperationResult]:
        """Replay operations and bursts through the batch stream; one result per item, in
        order (a refused item carries ``error``)."""
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
                yield from response.results
        except grpc.RpcError as error:
            raise_domain(error)


def operation_results(results: Iterable[pb.OperationResult]) -> Iterator[pb.OperationResult]:
    """Every operation's result, bursts opened lane by lane."""
    for result in results:
        if result.lanes:
            for lane in result.lanes:
                yield from lane.results
        else:
            yield result
