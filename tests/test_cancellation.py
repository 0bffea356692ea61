"""What a batch that ends early has done: a cancelled stream applies no entry after the one
running, a deleted VM stops its batches, and a deleted VM's EPT is freed at once."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import grpc
import pytest

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.events import FaultRange, Op, WriteMsr
from mtrremu.core.units import GIB, MIB, Level
from mtrremu.rpc import convert
from mtrremu.server.clients import DEFAULT_CLIENT
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import serving

SPAN = 256 * MIB
PAGES = SPAN // 4096
PAIRS = 10_000  # 20,000 operations: the largest batch; seconds of work
CONFIG = VmConfig(
    vcpus=1, noncoherent_dma=1, max_mapping_level=Level.K4, memslots=(Memslot.from_bytes(0, SPAN),)
)


def batch(vm_id: str) -> Iterator[pb.ExecuteRequest]:
    """Fault the whole VM in, zap it all (a defType write under zap-all), again and again."""
    pair: list[Op] = [FaultRange(0, 0, SPAN), WriteMsr(0, msrs.DEFTYPE, 0xC06, host=True)]
    operations = [convert.operation_message(op) for _ in range(PAIRS) for op in pair]
    yield pb.ExecuteRequest(vm_id=vm_id, operations=operations, batch_id=0)


def wait_until_started(client: Client, vm_id: str) -> None:
    deadline = time.monotonic() + 20
    while not client.vm(vm_id).counters().faults:
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.01)


def test_a_cancelled_batch_stops_and_what_took_effect_is_a_prefix() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(CONFIG, "zap-all")
        call = client.stub.Execute(batch(vm.vm_id))
        wait_until_started(client, vm.vm_id)
        call.cancel()  # type: ignore[no-untyped-call]
        time.sleep(0.3)  # hundreds of operations' time: the server has stopped by now
        counters = vm.counters()
        time.sleep(0.5)
        assert vm.counters() == counters  # nothing more is applied
        # Whole pairs, in order: each fault installed every page, each write zapped them all.
        faulted, zapped = counters.faults // PAGES, counters.zap_events
        assert counters.faults == faulted * PAGES
        assert 0 < faulted < PAIRS
        assert zapped in (faulted - 1, faulted)


def test_deleting_a_vm_stops_its_batch_and_frees_its_ept_at_once() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(CONFIG, "zap-all")
        store = weakref.ref(server.table.vm(vm.vm_id, DEFAULT_CLIENT).store)
        outcome: list[grpc.RpcError] = []

        def run() -> None:
            try:
                list(client.stub.Execute(batch(vm.vm_id)))
            except grpc.RpcError as error:
                outcome.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        wait_until_started(client, vm.vm_id)
        gc.disable()  # freed by the deletion itself, not by the cycle collector
        try:
            vm.delete()
            assert store() is None
        finally:
            gc.enable()
        worker.join(timeout=30)
        assert not worker.is_alive()
        (error,) = outcome
        assert error.code() is grpc.StatusCode.NOT_FOUND
        trailers: dict[str, object] = dict(error.trailing_metadata() or ())  # type: ignore[arg-type]
        assert trailers["mtrremu-reason"] == "VM_NOT_FOUND"


def test_a_deleted_vm_is_refused_by_every_later_call() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(VmConfig(memslots=(Memslot.from_bytes(0, GIB),)), "zap-all")
        vm.delete()
        with pytest.raises(Exception, match="does not exist"):
            vm.counters()
