#!/usr/bin/env python3
"""gRPC benchmark: the emulator against a no-op servicer with the same message shapes.

Both servers run in this process on loopback and take turns, measured in the same run:

(a) batched: MSR writes that zap nothing (vCPUs at CR0.CD=1, every MTRR MSR written in turn,
    round-robin on vCPUs), replayed with the client's ``execute`` (1000 per message through
    the ``Execute`` stream), as the A/B harness replays traces; the no-op servicer answers
    each with an empty outcome. After each vCPU's first round every write stores the value
    its register already holds (the emulator's rewrite path, which skips validation and the
    store: what a VMM's full register push sends for every register it did not change).
    For comparison, not a target: the same writes alternating between two values, so that
    each changes its register (validated, stored, the register version bumped).
(b) unary: one ``WriteMsr`` call per write against a no-op ``WriteMsr``.

Last line: ``batched_ratio=<x> unary_ratio=<y>`` (emulator throughput / no-op throughput;
targets: batched >= 0.75, unary >= 0.8; docs/architecture.md#tests-and-benchmarks).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import Item, WriteMsr
from mtrremu.core.memtypes import MemType
from mtrremu.server.app import EmulatorServer, ServerSettings
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc
from mtrremu.workloads.building import WB_BYTES


class NoOp(pb_grpc.EmulatorServiceServicer):
    """Answers the two benchmarked RPCs with empty outcomes of the same shape."""

    def WriteMsr(
        self, request: pb.WriteMsrRequest, context: grpc.ServicerContext
    ) -> pb.WriteMsrResponse:
        response = pb.WriteMsrResponse()
        response.outcome.counters.SetInParent()
        return response

    def Execute(
        self, request_iterator: Iterator[pb.ExecuteRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteResponse]:
        for request in request_iterator:
            response = pb.ExecuteResponse(batch_id=request.batch_id, last=True)
            results = response.results
            for entry in range(len(request.operations)):
                results.add(entry=entry).outcome.counters.SetInParent()
            yield response


def writes(vcpus: int, count: int, *, changing: bool = False) -> list[Item]:
    """MTRR writes (at CD=1 they zap nothing under the series' rules), round-robin on vCPUs:
    each MSR gets the same value every time, or (``changing``) one of two in turn."""
    cycle = [msrs.DEFTYPE, *msrs.FIXED_MSRS, *msrs.VAR_MSRS]
    period = math.lcm(len(cycle), vcpus)  # a (vCPU, MSR) pair comes back this often
    ops: list[Item] = []
    for i in range(count):
        msr = cycle[i % len(cycle)]
        other = changing and (i // period) % 2 == 1
        if msr == msrs.DEFTYPE:
            value = 0xC00 if other else 0xC06
        elif msrs.is_fixed_msr(msr):
            value = WB_BYTES if other else 0
        elif msrs.var_pair(msr)[1]:  # a mask, V never set: no pair becomes valid
            value = 0xF_C000_0000 if other else 0
        else:
            value = MemType.WB if other else 0
        ops.append(WriteMsr(i % vcpus, msr, value))
    return ops


def batched_rate(target: str, vm_id: str, ops: list[Item], batch: int) -> float:
    """Operations per second replayed through the client's batch stream (as the A/B harness
    replays traces)."""
    client = Client(target)
    vm = client.vm(vm_id)
    started = time.perf_counter()
    results = vm.execute(ops, batch)
    elapsed = time.perf_counter() - started
    assert len(results) == len(ops) and not any(r.HasField("error") for r in results)
    client.close()
    return len(ops) / elapsed


def unary_rate(target: str, vm_id: str, calls: int) -> float:
    client = Client(target)
    request = pb.WriteMsrRequest(
        vm_id=vm_id, operation=pb.WriteMsrOperation(vcpu=0, msr=msrs.PAT, value=msrs.PAT_DEFAULT)
    )
    started = time.perf_counter()
    for _ in range(calls):
        client.stub.WriteMsr(request)
    elapsed = time.perf_counter() - started
    client.close()
    return calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200_000, help="batched operations")
    parser.add_argument("--batch", type=int, default=1000, help="operations per message")
    parser.add_argument("--calls", type=int, default=3000, help="unary calls")
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs of each server")
    args = parser.parse_args()

    emulator = EmulatorServer(ServerSettings(listen=("127.0.0.1:0",)))
    (emulator_target,) = emulator.start()
    noop = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    # The stubs mark every RPC abstract; at run time the base answers UNIMPLEMENTED.
    pb_grpc.add_EmulatorServiceServicer_to_server(NoOp(), noop)  # type: ignore[abstract]
    noop_port = noop.add_insecure_port("127.0.0.1:0")
    noop.start()
    noop_target = f"127.0.0.1:{noop_port}"

    with Client(emulator_target) as client:
        vm = client.create_vm(VmConfig(vcpus=8, noncoherent_dma=1), "fine-grained")
        vm_id = vm.vm_id
    ops, changing = writes(8, args.ops), writes(8, args.ops, changing=True)

    # The two servers take turns, so a slow spell of this shared machine hits both alike.
    emu_b = noop_b = emu_c = noop_c = emu_u = noop_u = 0.0
    for _ in range(args.repeat):
        emu_b = max(emu_b, batched_rate(emulator_target, vm_id, ops, args.batch))
        noop_b = max(noop_b, batched_rate(noop_target, "noop", ops, args.batch))
        emu_c = max(emu_c, batched_rate(emulator_target, vm_id, changing, args.batch))
        noop_c = max(noop_c, batched_rate(noop_target, "noop", changing, args.batch))
    for _ in range(args.repeat):
        emu_u = max(emu_u, unary_rate(emulator_target, vm_id, args.calls))
        noop_u = max(noop_u, unary_rate(noop_target, "noop", args.calls))
    with Client(emulator_target) as client:
        counters = client.vm(vm_id).counters()
    assert counters.zaps_executed == 0, "the benchmarked writes must not zap"

    emulator.stop(0)
    noop.stop(0)
    print(f"batched: emulator {emu_b:,.0f} ops/s, no-op {noop_b:,.0f} ops/s ({args.batch}/message)")
    print(
        f"batched, each write changing its register (for comparison): emulator {emu_c:,.0f}"
        f" ops/s, no-op {noop_c:,.0f} ops/s, ratio {emu_c / noop_c:.2f}"
    )
    print(f"unary:   emulator {emu_u:,.0f} calls/s, no-op {noop_u:,.0f} calls/s")
    print(f"batched_ratio={emu_b / noop_b:.2f} unary_ratio={emu_u / noop_u:.2f}")


if __name__ == "__main__":
    main()
