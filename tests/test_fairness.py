"""Fair service: streams are bounded in total and per client, idle ones are cancelled, and
health checks are served while every stream slot is taken."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.errors import InvalidArgument
from mtrremu.core.events import FaultRange, Op, ReadVcpuState, WriteMsr
from mtrremu.core.units import MIB, Level
from mtrremu.rpc import convert
from mtrremu.server.app import ServerSettings
from mtrremu.server.fairness import StreamLimits, client_of
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import serving

#: 256 MiB at 4 KiB leaves, faulted in and zapped (zap-all) 2,000 times: about a second.
BIG = VmConfig(
    noncoherent_dma=1, max_mapping_level=Level.K4, memslots=(Memslot.from_bytes(0, 256 * MIB),)
)
WORK: list[Op] = [
    op
    for _ in range(2000)
    for op in (FaultRange(0, 0, 256 * MIB), WriteMsr(0, msrs.DEFTYPE, 0xC06, host=True))
]


class IdleStream:
    """An Execute stream that sends nothing until released (a slow or hostile client)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._release = threading.Event()
        stub = channel.stream_stream(
            "/mtrremu.v1.EmulatorService/Execute",
            pb.ExecuteRequest.SerializeToString,
            pb.ExecuteResponse.FromString,
        )
        self.call = stub(self._requests())
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.ExecuteRequest]:
        self._release.wait(60)
        return
        yield

    def _read(self) -> None:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as error:
            self.error = error

    def finished(self, timeout: float) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def close(self) -> None:
        self._release.set()
        self.call.cancel()  # type: ignore[no-untyped-call]


def open_streams(channel: grpc.Channel, count: int) -> list[IdleStream]:
    return [IdleStream(channel) for _ in range(count)]


def refused(streams: list[IdleStream]) -> list[IdleStream]:
    """The streams the server ended at once with RESOURCE_EXHAUSTED."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(s.error for s in streams):
        time.sleep(0.02)
    time.sleep(0.2)
    return [s for s in streams if s.error and s.error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_client_of_names_a_host_not_a_connection() -> None:
    assert client_of("ipv4:127.0.0.1:50321") == client_of("ipv4:127.0.0.1:50999")
    assert client_of("ipv6:[::1]:4000") == "ipv6:[::1]"
    assert client_of("unix:/tmp/a.sock") == client_of("unix:") == "unix"


def test_streams_beyond_the_bounds_are_refused_and_health_is_still_served(
    tmp_path: Path,
) -> None:
    limits = StreamLimits(max_streams=6, max_streams_per_client=4)
    sock = f"unix:{tmp_path / 'm.sock'}"
    with serving("127.0.0.1:0", sock, max_workers=12, streams=limits) as server:
        tcp, unix = server.addresses  # two clients: a TCP host and the local unix one
        with grpc.insecure_channel(tcp) as first, grpc.insecure_channel(unix) as second:
            mine = open_streams(first, 6)
            assert len(refused(mine)) == 2  # 4 per client
            theirs = open_streams(second, 4)
            assert len(refused(theirs)) == 2  # 6 in all
            assert server.guard.running == 6
            with Client(tcp, timeout=2) as client:
                for _ in range(20):
                    assert client.health() == "SERVING"
                vm = client.create_vm(strategy="zap-all")
                assert vm.counters().faults == 0
            for stream in mine + theirs:
                stream.close()
        deadline = time.monotonic() + 5
        while server.guard.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.guard.running == 0


def test_an_idle_stream_is_cancelled_and_its_slot_freed() -> None:
    limits = StreamLimits(max_streams=2, max_streams_per_client=2, stream_idle_seconds=0.3)
    with (
        serving(max_workers=4, streams=limits) as server,
        grpc.insecure_channel(server.addresses[0]) as channel,
    ):
        (stream,) = open_streams(channel, 1)
        assert stream.finished(timeout=10)
        assert stream.error is not None
        assert stream.error.code() is grpc.StatusCode.CANCELLED
        assert server.guard.running == 0
        with Client(server.addresses[0]) as client:  # a stream at work is never idle
            vm = client.create_vm(BIG, "zap-all")
            started = time.monotonic()
            results = vm.execute(WORK)
            assert time.monotonic() - started > 0.3  # longer than the idle timeout
            assert len(results) == len(WORK) and not any(r.HasField("error") for r in results)


def test_a_stream_whose_client_stops_reading_is_idle() -> None:
    """Its replies wait for a client that never takes them: the slot is freed all the same."""
    limits = StreamLimits(max_streams=2, max_streams_per_client=1, stream_idle_seconds=0.5)
    with serving(max_workers=4, streams=limits) as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(VmConfig(vcpus=4))
        ops = [convert.operation_message(ReadVcpuState(v % 4)) for v in range(4000)]
        batches = [pb.ExecuteRequest(vm_id=vm.vm_id, operations=ops, batch_id=i) for i in range(20)]
        unread = client.stub.Execute(iter(batches))  # answers of megabytes, never read
        deadline = time.monotonic() + 20
        while not server.guard.running and time.monotonic() < deadline:
            time.sleep(0.01)  # until the server has admitted it
        assert server.guard.running == 1
        while server.guard.running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.guard.running == 0
        assert list(client.stub.Execute(iter([]), timeout=10)) == []  # the slot is free
        unread.cancel()  # type: ignore[no-untyped-call]


def test_settings_keep_threads_for_unary_calls() -> None:
    with pytest.raises(InvalidArgument, match="must be below max_workers"):
        ServerSettings(max_workers=8, streams=StreamLimits(max_streams=8))
