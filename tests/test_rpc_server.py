"""The gRPC service over real sockets: every RPC, health, reflection, shutdown, limits, errors,
and several vCPU threads meeting in one VM's zap list."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from mtrremu.client import Client, RemoteVm
from mtrremu.core import msrs
from mtrremu.core.config import MAX_MEMSLOT_NAME, MAX_MEMSLOTS, Memslot, MemslotKind, VmConfig
from mtrremu.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidConfig,
    NotFound,
    RejectedHostWrite,
    ResourceExhausted,
    UnknownStrategy,
    UnknownVcpu,
    UnknownVm,
)
from mtrremu.core.events import Access, Burst, WriteCr0, WriteMsr
from mtrremu.core.memtypes import MemType, is_mtrr_type
from mtrremu.core.units import Level
from mtrremu.rpc.status import from_rpc_error
from mtrremu.server.app import EmulatorServer, ServerSettings
from mtrremu.server.clients import DEFAULT_CLIENT
from mtrremu.server.limits import Limits
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc
from tests.helpers import CD0, CD1, GIB, KIB, MIB, run_threads, serving, var_mask

SLOTS = (
    Memslot.from_bytes(0, 640 * KIB),
    Memslot.from_bytes(MIB, 2 * GIB - MIB),
    Memslot.from_bytes(0xE0000000, 16 * MIB, MemslotKind.DEVICE),
    Memslot.from_bytes(4 * GIB, 2 * GIB),
)
CONFIG = VmConfig(vcpus=4, noncoherent_dma=1, memslots=SLOTS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorServer]:
    sock = tmp_path_factory.mktemp("sock") / "mtrremu.sock"
    with serving("127.0.0.1:0", f"unix:{sock}") as running:
        yield running


@pytest.fixture(scope="module", params=["tcp", "unix"])
def client(server: EmulatorServer, request: pytest.FixtureRequest) -> Iterator[Client]:
    tcp, unix = server.addresses
    with Client(tcp if request.param == "tcp" else unix) as connected:
        connected.wait_ready()
        yield connected


def vm_with_mtrrs(client: Client, strategy: str = "fine-grained") -> RemoteVm:
    vm = client.create_vm(CONFIG, strategy)
    for vcpu in range(CONFIG.vcpus):
        vm.write_msr(vcpu, msrs.PHYSBASE0, 0xC0000000, host=True)
        vm.write_msr(vcpu, msrs.PHYSBASE0 + 1, var_mask(GIB), host=True)
        vm.write_msr(vcpu, msrs.DEFTYPE, 0xC06, host=True)
    return vm


# -- every RPC -------------------------------------------------------------------------


def test_create_get_list_and_delete(client: Client) -> None:
    vm = client.create_vm(CONFIG, "zap-all-serialized", {})
    described = vm.describe()
    assert described.vm_id == vm.vm_id
    assert described.strategy == "zap-all-serialized"
    assert described.profile == pb.PROFILE_KVM_6_7
    assert described.config.vcpus == 4 and described.config.guest_maxphyaddr == 40
    assert [s.size_bytes for s in described.config.memslots] == [s.pages << 12 for s in SLOTS]
    assert described.config.memslots[2].kind == pb.MEMSLOT_KIND_DEVICE
    assert described.noncoherent_dma == 1
    assert vm.vm_id in [v.vm_id for v in client.list_vms()]
    vm.delete()
    assert vm.vm_id not in [v.vm_id for v in client.list_vms()]
    with pytest.raises(NotFound):
        vm.describe()


def test_defaults_fill_an_empty_config(client: Client) -> None:
    response = client.stub.CreateVm(pb.CreateVmRequest())
    config = response.vm.config
    assert (config.vcpus, config.guest_maxphyaddr, config.max_mapping_level) == (
        1,
        40,
        pb.LEVEL_1G,
    )
    assert config.quirk_cd_nw_cleared and config.feature_mtrr and config.tdp
    assert response.vm.strategy == "fine-grained"
    client.vm(response.vm.vm_id).delete()


def test_msr_write_read_and_guest_gp(client: Client) -> None:
    vm = vm_with_mtrrs(client)
    assert vm.read_msr(1, msrs.PHYSBASE0 + 1, host=True).value == var_mask(GIB)
    assert vm.read_msr(0, msrs.MTRRCAP).value == 0x508
    gp = vm.write_msr(0, msrs.PHYSBASE0 + 2, 2)  # type 2: illegal
    assert "MTRRphysBase1" in gp.guest_fault.reason
    assert gp.counters.guest_gp == 1
    assert vm.read_msr(0, 0x1234).guest_fault.reason  # RDMSR of an unknown MSR: #GP
    with pytest.raises(RejectedHostWrite) as refused:
        vm.write_msr(0, msrs.PHYSBASE0 + 2, 2, host=True)
    assert refused.value.register == "MTRRphysBase1" and refused.value.value == 2
    assert vm.read_msr(0, msrs.PHYSBASE0 + 2, host=True).value == 0


def test_cr0_writes_reset_and_init(client: Client) -> None:
    vm = vm_with_mtrrs(client)
    assert vm.vcpu_state(0).cr0 == 0x60000010
    cleared = vm.write_cr0(0, CD0)
    assert cleared.cd_toggled and cleared.zap.zap_event
    assert cleared.zap.role == pb.ZAP_ROLE_DRAINED
    assert vm.vcpu_state(0).cr0 == CD0
    assert vm.write_cr0(0, 1 << 32).guest_fault.reason == "MOV CR0: bits 63:32 set"
    with pytest.raises(RejectedHostWrite):
        vm.write_cr0(0, 1 << 29, host=True)  # NW without CD
    assert not vm.write_cr0(1, CD0, host=True).HasField("zap")
    assert vm.init(1).value == 0x10
    assert vm.reset(1).value == 0x60000010


def test_accesses_bulk_faults_lookup_and_dump(client: Client) -> None:
    vm = vm_with_mtrrs(client)
    vm.write_cr0(0, CD0)
    fault = vm.access(0, 0x1234)
    assert fault.access.kind == pb.ACCESS_KIND_FAULT
    assert fault.access.mapping.level == pb.LEVEL_4K  # [0, 2M) straddles the 640K hole
    hit = vm.access(0, 0x1000)
    assert hit.access.kind == pb.ACCESS_KIND_HIT
    mmio = vm.access(0, 0xC0000000)
    assert mmio.access.kind == pb.ACCESS_KIND_MMIO_EXIT
    bulk = vm.fault_range(0, 4 * GIB, 6 * GIB)
    assert bulk.fault_range.installed.leaves_1g == 2
    assert bulk.fault_range.hits == (2 * GIB >> 12) - 2
    device = vm.access(0, 0xE0000000)
    assert device.access.mapping.memory_type == pb.MEMORY_TYPE_UC
    looked = vm.lookup(4 * GIB + 5)
    assert looked.mapping.level == pb.LEVEL_1G and looked.mapping.base_gpa == 4 * GIB
    assert vm.lookup(0xC0000000).mmio
    runs = list(vm.dump_leaves(runs_per_message=1))
    assert sum(r.leaves for r in runs) == sum(
        getattr(vm.describe().leaves, f) for f in ("leaves_4k", "leaves_2m", "leaves_1g")
    )
    assert [r.start_gpa for r in runs] == sorted(r.start_gpa for r in runs)
    one_g = [r for r in runs if r.level == pb.LEVEL_1G]
    assert [(r.start_gpa, r.leaves) for r in one_g] == [(4 * GIB, 2)]


def test_dma_attach_detach_and_the_failed_precondition(client: Client) -> None:
    vm = client.create_vm(VmConfig(noncoherent_dma=0), "zap-all")
    vm.access(0, 0)
    attached = vm.attach_dma()
    assert attached.value == 1 and attached.counters.dma_zap_events == 1
    assert attached.counters.leaves_removed_1g == 1
    assert vm.detach_dma().value == 0
    with pytest.raises(FailedPrecondition):
        vm.detach_dma()


def test_counters_staleness_and_strategies(client: Client) -> None:
    vm = vm_with_mtrrs(client, "kvm-6.7")
    vm.write_msr(0, msrs.PHYSBASE0 + 2, GIB, host=True)  # pair 1: UC over [1 GiB, 2 GiB)
    vm.write_msr(0, msrs.PHYSBASE0 + 3, var_mask(GIB), host=True)
    assert vm.access(0, GIB).access.mapping.memory_type == pb.MEMORY_TYPE_WB  # CD=1
    vm.write_cr0(0, CD0)  # 6.7 with the quirk on: no zap
    stale = vm.staleness(0)
    assert stale.stale_leaves == 1 and not stale.quiescent
    (example,) = stale.examples
    assert (example.have.base_gpa, example.have.level) == (GIB, pb.LEVEL_1G)
    assert (example.have.memory_type, example.want.memory_type) == (
        pb.MEMORY_TYPE_WB,
        pb.MEMORY_TYPE_UC,
    )
    assert not vm.staleness(at_quiescence=True).quiescent
    counters = vm.counters()
    # Base1: each defType write (E=1) zaps all; pair 1 base and mask writes on vCPU 0 too.
    assert (counters.faults, counters.zap_events) == (1, CONFIG.vcpus + 2)
    names = {s.name: s for s in client.list_strategies()}
    assert set(names) >= {"kvm-6.5", "kvm-6.7", "kvm-6.11", "fine-grained-split"}
    assert names["fine-grained"].distribution == "mtrremu"
    assert names["kvm-6.11"].profile == pb.PROFILE_KVM_6_11


def test_execute_runs_operations_and_bursts_in_order(client: Client) -> None:
    vm = vm_with_mtrrs(client, "zap-all-serialized")
    results = vm.execute(
        [
            WriteMsr(0, msrs.PAT, msrs.PAT_DEFAULT),
            WriteMsr(0, msrs.DEFTYPE, 1 << 20, host=True),  # refused
            Burst(tuple((v, (WriteCr0(v, CD0),)) for v in range(4)), seed=5),
            Access(1, 0x1000),
        ]
    )
    assert [r.entry for r in results] == [0, 1, 2, 2, 2, 2, 3]
    assert results[0].HasField("outcome") and not results[0].HasField("error")
    error = results[1].error
    assert (error.code, error.status, error.reason) == (
        3,
        "INVALID_ARGUMENT",
        "HOST_WRITE_REJECTED",
    )
    assert dict(error.metadata) == {
        "register": "MTRRdefType",
        "value": "0x100000",
        "why": error.metadata["why"],
    }
    lanes = results[2:6]
    assert [(r.lane.vcpu, r.lane.index) for r in lanes] == [(v, 0) for v in range(4)]
    roles = sorted(r.outcome.zap.role for r in lanes)
    assert roles == [pb.ZAP_ROLE_DRAINED] + [pb.ZAP_ROLE_WAITED] * 3
    assert not results[6].HasField("lane")
    assert results[6].outcome.access.kind == pb.ACCESS_KIND_FAULT
    assert vm.counters().duplicates_dropped == 3


def test_a_malformed_batch_operation_is_an_error_result(client: Client) -> None:
    vm = client.create_vm(CONFIG)
    ops = [
        pb.Operation(),  # no kind
        pb.Operation(fault_range=pb.FaultRangeOperation(vcpu=0, start_gpa=1, end_gpa=4096)),
        pb.Operation(burst=pb.Burst(lanes=[pb.Lane(vcpu=0, operations=[pb.Operation()])])),
        pb.Operation(read_msr=pb.ReadMsrOperation(vcpu=9, msr=msrs.PAT)),
    ]
    results = list(vm.execute_messages(ops))
    assert [r.error.status for r in results] == [
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
    ]
    assert [r.error.code for r in results] == [3, 3, 3, 5]
    assert (results[3].error.reason, dict(results[3].error.metadata)) == (
        "VCPU_NOT_FOUND",
        {"vcpu": "9", "vcpus": "4"},
    )


# -- errors ------------------------------------------------------------------------------


def test_each_error_status_with_its_reason(client: Client) -> None:
    with pytest.raises(UnknownStrategy, match="valid strategies"):
        client.create_vm(CONFIG, "no-such-strategy")
    with pytest.raises(InvalidArgument, match="does not take option"):
        client.create_vm(CONFIG, "zap-all", {"knob": "1"})
    overlapping = pb.CreateVmRequest(  # raw: the client's own VmConfig would refuse it first
        config=pb.VmConfig(
            memslots=[
                pb.Memslot(base_gpa=0, size_bytes=GIB),
                pb.Memslot(base_gpa=GIB // 2, size_bytes=GIB),
            ]
        )
    )
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.CreateVm(overlapping)
    refused = from_rpc_error(caught.value)
    assert isinstance(refused, InvalidConfig) and "overlap" in str(refused)
    vm = client.create_vm(CONFIG)
    with pytest.raises(UnknownVcpu, match="vCPU 7") as vcpu:
        vm.write_cr0(7, CD0)
    assert (vcpu.value.vcpu, vcpu.value.vcpus) == (7, 4)
    with pytest.raises(UnknownVm, match="does not exist") as unknown:
        client.vm("vm-nope").counters()
    assert unknown.value.vm_id == "vm-nope"
    with pytest.raises(InvalidArgument, match="4 KiB aligned"):
        vm.fault_range(0, 0x10, 0x2000)
    with pytest.raises(InvalidArgument, match="outside the guest-physical space"):
        vm.access(0, 1 << 50)


def test_raw_statuses_carry_error_info(client: Client) -> None:
    try:
        client.stub.GetVm(pb.GetVmRequest(vm_id="missing"))
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        status = rpc_status.from_call(error)
        info = error_details_pb2.ErrorInfo()
        assert status is not None and status.details[0].Unpack(info)
        assert (info.reason, info.domain) == ("VM_NOT_FOUND", "mtrremu.v1")
        assert dict(info.metadata) == {"vm_id": "missing"}
        # The same, as plain trailers, for clients without google/rpc/status.proto.
        trailers = dict(error.trailing_metadata() or ())
        assert trailers["mtrremu-reason"] == "VM_NOT_FOUND"
        assert trailers["mtrremu-vm_id"] == "missing"
    else:
        pytest.fail("GetVm of a missing VM succeeded")


# -- health and reflection ---------------------------------------------------------------


def test_health_reports_serving(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("mtrremu.v1.EmulatorService") == "SERVING"


def test_reflection_lists_the_services(client: Client) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"mtrremu.v1.EmulatorService", "grpc.health.v1.Health"} <= names


# -- limits ------------------------------------------------------------------------------


@contextmanager
def limited(**limits: int) -> Iterator[Client]:
    """A client of a server of its own with these limits."""
    with serving(limits=Limits(**limits)) as server, Client(server.addresses[0]) as client:
        yield client


def test_the_vm_limit() -> None:
    with limited(max_vms=2) as client:
        first = client.create_vm()
        client.create_vm()
        with pytest.raises(ResourceExhausted, match="2 VMs"):
            client.create_vm()
        first.delete()
        client.create_vm()


def test_the_memory_limits_per_vm_and_in_total() -> None:
    with limited(max_vm_memory_bytes=8 * GIB, max_total_memory_bytes=12 * GIB) as client:
        with pytest.raises(ResourceExhausted, match="per VM"):
            client.create_vm(VmConfig(memslots=(Memslot.from_bytes(0, 9 * GIB),)))
        client.create_vm(VmConfig(memslots=(Memslot.from_bytes(0, 8 * GIB),)))
        with pytest.raises(ResourceExhausted, match="all VMs"):
            client.create_vm(VmConfig(memslots=(Memslot.from_bytes(0, 5 * GIB),)))


def test_a_vm_whose_description_would_exceed_the_reply_limit_is_not_created(
    client: Client,
) -> None:
    def named(count: int) -> VmConfig:
        return VmConfig(
            memslots=tuple(
                Memslot.from_bytes(
                    i * 8 * KIB, 4 * KIB, name=f"{i:05}".ljust(MAX_MEMSLOT_NAME, "n")
                )
                for i in range(count)
            )
        )

    before = [vm.vm_id for vm in client.list_vms()]
    # Each memslot takes about 270 bytes of the answer: 16,000 of them pass 4 MiB.
    with pytest.raises(ResourceExhausted, match="nothing was created"):
        client.create_vm(named(16_000))
    assert [vm.vm_id for vm in client.list_vms()] == before
    fits = client.create_vm(named(10_000))
    assert fits.describe().memslot_count == 10_000
    fits.delete()


def test_list_vms_pages_in_creation_order() -> None:
    with limited(max_vms=30) as client:
        created = [client.create_vm().vm_id for _ in range(25)]
        first = client.stub.ListVms(pb.ListVmsRequest(page_size=10))
        assert [vm.vm_id for vm in first.vms] == created[:10] and first.next_page_token
        client.vm(created[10]).delete()  # deleted between pages: skipped
        later = client.create_vm().vm_id  # created between pages: on a later page
        second = client.stub.ListVms(
            pb.ListVmsRequest(page_size=10, page_token=first.next_page_token)
        )
        assert [vm.vm_id for vm in second.vms] == created[11:21]
        third = client.stub.ListVms(
            pb.ListVmsRequest(page_size=10, page_token=second.next_page_token)
        )
        assert [vm.vm_id for vm in third.vms] == [*created[21:], later]
        assert third.next_page_token == ""
        assert [vm.vm_id for vm in client.list_vms()] == [*created[:10], *created[11:], later]
        assert all(not vm.config.memslots and vm.memslot_count == 1 for vm in third.vms)
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.ListVms(pb.ListVmsRequest(page_token="x"))
        refused = from_rpc_error(caught.value)
        assert isinstance(refused, InvalidArgument) and "page_token" in str(refused)


def test_memslot_count_and_name_limits(client: Client) -> None:
    one = pb.Memslot(base_gpa=0, size_bytes=4 * KIB)
    long_name = pb.Memslot(base_gpa=0, size_bytes=4 * KIB, name="n" * (MAX_MEMSLOT_NAME + 1))
    too_many = [
        pb.Memslot(base_gpa=i * 8 * KIB, size_bytes=4 * KIB) for i in range(MAX_MEMSLOTS + 1)
    ]
    for slots, match in ((too_many, f"{MAX_MEMSLOTS} memslots"), ([long_name], "characters")):
        request = pb.CreateVmRequest(config=pb.VmConfig(memslots=slots))
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.CreateVm(request)
        refused = from_rpc_error(caught.value)
        assert isinstance(refused, InvalidConfig) and match in str(refused), refused
    named = pb.Memslot(base_gpa=0, size_bytes=4 * KIB, name="n" * MAX_MEMSLOT_NAME)
    for slot in (one, named):
        created = client.stub.CreateVm(pb.CreateVmRequest(config=pb.VmConfig(memslots=[slot])))
        client.vm(created.vm.vm_id).delete()


def test_gpas_beyond_a_4_level_ept_are_refused(client: Client) -> None:
    vm = client.create_vm(VmConfig(guest_maxphyaddr=52))
    with pytest.raises(InvalidArgument, match="48 bits"):
        vm.access(0, 1 << 48)
    with pytest.raises(InvalidArgument, match="beyond"):
        vm.fault_range(0, (1 << 48) - 4 * KIB, (1 << 48) + 4 * KIB)
    assert vm.access(0, (1 << 48) - 4 * KIB).access.kind == pb.ACCESS_KIND_MMIO_EXIT
    vm.delete()


def test_the_batch_and_message_limits() -> None:
    with limited(max_batch_operations=10, max_message_bytes=64 * KIB) as client:
        vm = client.create_vm()
        ops = [WriteMsr(0, msrs.PAT, msrs.PAT_DEFAULT)] * 11
        with pytest.raises(ResourceExhausted, match="limit is 10"):
            vm.execute(ops, batch_size=11)
        assert len(vm.execute(ops, batch_size=10)) == 11
        huge = pb.CreateVmRequest(strategy="x" * (128 * KIB))
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.CreateVm(huge)
        assert isinstance(caught.value, grpc.Call)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_largest_batch_reaches_a_client_with_default_settings(server: EmulatorServer) -> None:
    """The reported failure: 20,000 CD toggles (the default batch limit) whose answers list 9
    ranges each make 5 MB of results, over the 4 MiB a default gRPC client accepts."""
    batch = Limits().max_batch_operations
    with Client(server.addresses[0]) as client:
        vm = client.create_vm(VmConfig(noncoherent_dma=1), "fine-grained")
        for pair in range(8):  # 8 non-WB ranges and the fixed range: 9 ranges per toggle
            vm.write_msr(
                0, msrs.PHYSBASE0 + 2 * pair, (2 * pair + 1) * 64 * MIB | MemType.UC, host=True
            )
            vm.write_msr(0, msrs.PHYSBASE0 + 2 * pair + 1, var_mask(64 * MIB), host=True)
        for fixed in msrs.FIXED_MSRS:
            vm.write_msr(0, fixed, 0, host=True)
        vm.write_msr(0, msrs.DEFTYPE, 0xC06, host=True)
        toggles = [
            pb.Operation(write_cr0=pb.WriteCr0Operation(vcpu=0, value=CD0 if i % 2 == 0 else CD1))
            for i in range(batch)
        ]
        request = pb.ExecuteRequest(vm_id=vm.vm_id, operations=toggles, batch_id=7)
    with grpc.insecure_channel(server.addresses[0]) as channel:  # no options: gRPC's defaults
        stub = pb_grpc.EmulatorServiceStub(channel)
        responses = list(stub.Execute(iter([request])))
    results = [r for response in responses for r in response.results]
    assert [r.entry for r in results] == list(range(batch))
    assert sum(len(r.outcome.zap.requested) for r in results) == 9 * batch
    assert sum(r.ByteSize() for r in results) > 4 * MIB  # it would not fit one reply
    assert len(responses) >= 5 and all(r.ByteSize() <= MIB for r in responses)
    assert [r.batch_id for r in responses] == [7] * len(responses)
    assert [r.last for r in responses] == [False] * (len(responses) - 1) + [True]


# -- shutdown ----------------------------------------------------------------------------


def test_shutdown_lets_a_call_in_flight_finish_and_refuses_new_ones() -> None:
    server = EmulatorServer(ServerSettings(listen=("127.0.0.1:0",), grace_seconds=3))
    server.start()
    client = Client(server.addresses[0])
    vm = client.create_vm(VmConfig(noncoherent_dma=1), "zap-all-serialized")
    watch = health_pb2_grpc.HealthStub(client.channel).Watch(
        health_pb2.HealthCheckRequest(service="")
    )
    statuses: list[int] = []
    watcher = threading.Thread(
        target=lambda: statuses.extend(m.status for m in _until_cancelled(watch))
    )
    watcher.start()
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(10)

    server.table.vm(vm.vm_id, DEFAULT_CLIENT).zap_list.hooks.drain_started = hold
    outcome: list[pb.EventOutcome] = []
    caller = threading.Thread(target=lambda: outcome.append(vm.write_cr0(0, CD0)))
    caller.start()
    assert inside.wait(10)  # the call is in flight, held inside its drain
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            while True:  # until the server stops taking new calls
                Client(server.addresses[0], timeout=5).list_vms()
    finally:
        release.set()
    assert isinstance(refused.value, grpc.Call)
    # A call arriving as the listener closes is cancelled; one arriving after is unavailable.
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    caller.join(10)
    stopping.join(15)
    watcher.join(15)
    assert outcome and outcome[0].zap.role == pb.ZAP_ROLE_DRAINED
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert statuses[:1] == [serving] and not_serving in statuses
    client.close()


def _until_cancelled(
    stream: Iterator[health_pb2.HealthCheckResponse],
) -> Iterator[health_pb2.HealthCheckResponse]:
    try:
        yield from stream
    except grpc.RpcError:
        return


# -- concurrency -------------------------------------------------------------------------


def test_vcpu_threads_toggling_cd_at_once_meet_in_the_zap_list(server: EmulatorServer) -> None:
    target = server.addresses[0]
    with Client(target) as setup:
        vm = vm_with_mtrrs(setup, "fine-grained")
        vm_id = vm.vm_id
        vm.fault_range(0, 0, 2 * GIB)
    start = threading.Barrier(CONFIG.vcpus)
    roles: list[int] = []

    def vcpu_thread(index: int) -> None:
        with Client(target) as own:
            mine = own.vm(vm_id)
            start.wait(10)
            for round_ in range(21):
                result = mine.write_cr0(index, CD1 if round_ % 2 else CD0)
                roles.append(result.zap.role)

    run_threads(CONFIG.vcpus, vcpu_thread, timeout=60)
    assert len(roles) == CONFIG.vcpus * 21
    assert set(roles) <= {pb.ZAP_ROLE_DRAINED, pb.ZAP_ROLE_WAITED}
    with Client(target) as check:
        counters = check.vm(vm_id).counters()
        assert counters.drains + counters.waits == CONFIG.vcpus * 21
        stale = check.vm(vm_id).staleness(at_quiescence=True)
        assert stale.quiescent and stale.stale_leaves == 0
    assert server.table.vm(vm_id, DEFAULT_CLIENT).zap_list.queued() == []


def test_memory_type_values_are_0x100_plus_the_architectural_encoding() -> None:
    for mtype in (MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB):
        value = pb.MemoryType.Value(f"MEMORY_TYPE_{mtype.name}")
        assert value == 0x100 | mtype and value & 0xFF == mtype
        assert not is_mtrr_type(value)  # never usable as a register value by mistake
    assert [pb.Level.Value(f"LEVEL_{lv.label}") for lv in (Level.K4, Level.M2, Level.G1)] == [
        int(Level.K4),
        int(Level.M2),
        int(Level.G1),
    ]
