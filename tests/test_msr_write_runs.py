"""Runs of single-MSR writes (``Vm.write_msr_run``, what ``Execute`` uses for consecutive
``write_msr`` operations) do exactly what the same writes do one at a time: same outcome per
write, same registers, counters, EPT, oracle log and observer calls; a stop ends a run before
its next write. Over gRPC, a batch's results are the ones the in-process VM gives, whatever
mix of runs, malformed writes and other operations it holds, and however many responses its
bare results take."""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.errors import InvalidArgument, MtrremuError
from mtrremu.core.events import EventResult, Op, ReadMsr, WriteMsr
from mtrremu.core.memtype import Profile
from mtrremu.core.strategy import NO_ZAP, VcpuView, VmView, ZapDecision
from mtrremu.core.units import GIB, MIB, GfnRange
from mtrremu.core.vm import Vm
from mtrremu.rpc import convert
from mtrremu.rpc.transport import REPLY_CHUNK_BYTES
from mtrremu.server.servicer import RESULT_OVERHEAD_BYTES, RUN_WRITES
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import CD0, create_vm, serving

VCPUS = 3
MEMSLOTS = (Memslot.from_bytes(0, 640 * 1024), Memslot.from_bytes(MIB, GIB - MIB))
#: Every kind of MSR a write can name: emulated (PAT, defType, fixed, variable), read-only,
#: unknown, and beyond 64 bits.
MSRS = (
    msrs.PAT,
    msrs.DEFTYPE,
    msrs.FIXED_MSRS[0],
    msrs.FIXED_MSRS[5],
    msrs.PHYSBASE0,
    msrs.PHYSBASE0 + 1,
    msrs.PHYSBASE0 + 2,
    msrs.PHYSBASE0 + 3,
    msrs.MTRRCAP,
    0x10,
    1 << 64,
)
VALUES = (
    0,
    0x6,
    0xC06,
    0x806,
    0xC00,
    0x0606060606060606,
    0x0202020202020202,  # an illegal type in every byte
    0x80000006,
    0xC0000000,
    0xFC0000800,
    0xFFF0000800,
    msrs.PAT_DEFAULT,
    1 << 64,
    -1,
)
writes = st.lists(
    st.builds(
        WriteMsr,
        st.integers(-1, VCPUS),
        st.sampled_from(MSRS),
        st.sampled_from(VALUES),
        st.booleans(),
    ),
    max_size=60,
)


class RaisesOnVariable:
    """Zaps everything on a defType write, raises on a variable-range one, answers garbage on a
    fixed-range one: every way a strategy's answer turns a write's result into a full one."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision:
        if msr == msrs.DEFTYPE:
            return ZapDecision(zap_event=True, ranges=(GfnRange(0, 1 << 20),))
        if msrs.is_var_msr(msr):
            raise KeyError(msr)
        if msr == msrs.FIXED_MSRS[5]:
            return "garbage"  # type: ignore[return-value]
        return NO_ZAP

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision:
        return NO_ZAP

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        return NO_ZAP


class Recording:
    """An observer keeping what it was told (result fields, not the objects)."""

    active = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def zap_executed(self, vm_id: str, rng: GfnRange, outcome: object) -> None:
        self.calls.append(("zap", rng, outcome))

    def fault(self, vm_id: str, vcpu: int, result: EventResult) -> None:
        self.calls.append(("fault", vcpu, result.op))

    def event_handled(self, vm_id: str, result: EventResult) -> None:
        self.calls.append(("event", result.op, result.gp, result.counters))


def twins(kind: str) -> tuple[Vm, Vm, Recording | None, Recording | None]:
    """Two identical VMs (CD=0 on vCPU 0, so writes there may zap) and their observers."""
    pair: list[Vm] = []
    observers: list[Recording | None] = []
    for _ in range(2):
        config = VmConfig(vcpus=VCPUS, noncoherent_dma=1, memslots=MEMSLOTS)
        observer = None
        if kind == "raising":
            vm = Vm(config, RaisesOnVariable(), Profile.KVM_6_7)
        elif kind == "observed":
            observer = Recording()
            vm = Vm(config, create_vm(config, "kvm-6.5").strategy, Profile.KVM_6_5)
            vm._observer = observer
        else:
            config = VmConfig(
                vcpus=VCPUS, noncoherent_dma=1, memslots=MEMSLOTS, track_staleness=True
            )
            vm = create_vm(config, kind)
        vm.write_cr0(0, CD0)
        vm.fault_range(0, 0, 64 * MIB)
        pair.append(vm)
        observers.append(observer)
    return pair[0], pair[1], observers[0], observers[1]


def one_by_one(vm: Vm, ops: list[WriteMsr]) -> list[EventResult | MtrremuError]:
    outcomes: list[EventResult | MtrremuError] = []
    for op in ops:
        try:
            outcomes.append(vm.write_msr(op.vcpu, op.msr, op.value, host=op.host))
        except MtrremuError as error:
            outcomes.append(error)
    return outcomes


def state(vm: Vm) -> tuple[object, ...]:
    return (
        [(vc.cr0, vc.pat, vc.mtrr.snapshot(), tuple(vc.mtrr.order)) for vc in vm.vcpus],
        vm.counters_snapshot(),
        list(vm.leaf_runs()),
        vm.staleness,
        vm.changes,
    )


@given(ops=writes, kind=st.sampled_from(["fine-grained", "kvm-6.5", "raising", "observed"]))
def test_a_run_does_what_its_writes_do_one_at_a_time(ops: list[WriteMsr], kind: str) -> None:
    """Prediction: the same writes, on a twin VM, one ``write_msr`` call each."""
    run_vm, single_vm, run_seen, single_seen = twins(kind)
    outcomes = run_vm.write_msr_run(ops)
    expected = one_by_one(single_vm, ops)
    assert len(outcomes) == len(ops)
    for op, got, want in zip(ops, outcomes, expected, strict=True):
        if isinstance(want, MtrremuError):
            assert type(got) is type(want) and str(got) == str(want), op
        elif got is None:
            assert want == EventResult(op), f"{op}: bare in a run, {want} alone"
        else:  # (zap tickets compare by identity: compare their fields)
            assert isinstance(got, EventResult) and asdict(got) == asdict(want), op
    assert state(run_vm) == state(single_vm)
    if run_seen is not None and single_seen is not None:
        assert run_seen.calls == single_seen.calls


def test_a_stopped_run_writes_nothing_more() -> None:
    vm, _, _, _ = twins("fine-grained")
    ops = [WriteMsr(1, msrs.DEFTYPE, 0xC06), WriteMsr(2, msrs.DEFTYPE, 0xC06)]
    stop = threading.Event()
    stop.set()
    assert vm.write_msr_run(ops, stop=stop) == []
    vm.close()
    assert vm.write_msr_run(ops, stop=threading.Event()) == []  # a closed VM stops a run too
    assert [vc.mtrr.deftype for vc in vm.vcpus] == [0, 0, 0]


def test_a_write_that_zaps_nothing_still_counts_as_a_change() -> None:
    """What a state directory looks at to know a VM needs saving again."""
    vm = create_vm(VmConfig(vcpus=2, noncoherent_dma=1), "fine-grained")
    before = vm.changes
    assert vm.write_msr_run([WriteMsr(1, msrs.DEFTYPE, 0xC06)]) == [None]  # at CD=1: no zap
    assert vm.changes == before + 1


# -- over gRPC ---------------------------------------------------------------------------


def mixed_batch() -> list[Op]:
    """Runs longer than RUN_WRITES, broken by other operations and by refused writes."""
    ops: list[Op] = []
    for index in range(3 * RUN_WRITES + 7):
        vcpu = index % VCPUS
        ops.append(WriteMsr(vcpu, msrs.PHYSBASE0 + 2 * (index % 4), 0x80000006 + (index << 12)))
        if index % 97 == 0:
            ops.append(ReadMsr(vcpu, msrs.PHYSBASE0))
        if index % 131 == 0:
            ops.append(WriteMsr(VCPUS, msrs.DEFTYPE, 0xC06))  # no such vCPU
            ops.append(WriteMsr(vcpu, msrs.DEFTYPE, 0x0F00))  # reserved bits: a #GP
            ops.append(WriteMsr(vcpu, msrs.DEFTYPE, 0x0F00, host=True))  # refused
        if index % 50 == 0:
            ops.append(WriteMsr(0, msrs.DEFTYPE, 0xC06 ^ (index & 0x800)))  # at CD=0: zaps
    return ops


def expected_results(ops: list[Op], malformed: set[int]) -> list[pb.OperationResult]:
    """Each operation's result on an in-process twin, filled as the server fills it."""
    vm, _, _, _ = twins("fine-grained")
    results = []
    for entry, op in enumerate(ops):
        message = pb.OperationResult()
        outcome: EventResult | MtrremuError
        if entry in malformed:
            outcome = InvalidArgument("unknown initiator 9")
        else:
            try:
                outcome = vm.apply(op)
            except MtrremuError as error:
                outcome = error
        convert.fill_result(entry, outcome, message)
        results.append(message)
    return results


def test_a_mixed_batch_answers_as_the_vm_does_in_process() -> None:
    ops = mixed_batch()
    messages = [convert.operation_message(op) for op in ops]
    malformed = {5, RUN_WRITES + 3, len(ops) - 1}
    for entry in malformed:  # an unknown initiator: refused alone, the run around it goes on
        bad = pb.WriteMsrOperation(vcpu=0, msr=msrs.DEFTYPE, value=0xC06)
        bad.MergeFromString(b"\x20\x09")  # field 4 (initiator) = 9: no such Initiator
        messages[entry] = pb.Operation(write_msr=bad)
    with serving() as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(
            VmConfig(vcpus=VCPUS, noncoherent_dma=1, memslots=MEMSLOTS), "fine-grained"
        )
        vm.write_cr0(0, CD0)
        vm.fault_range(0, 0, 64 * MIB)
        got = list(vm.execute_messages(messages, batch_size=len(messages)))
    want = expected_results(ops, malformed)
    assert len(got) == len(want)
    for entry, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, (entry, ops[entry])


def test_bare_results_fill_responses_up_to_their_bound_in_order() -> None:
    """Prediction from the size rule: a bare result counts LIGHT_RESULT_BYTES plus its
    overhead, so a response holds at most REPLY_CHUNK_BYTES // that many of them."""
    per_response = REPLY_CHUNK_BYTES // (convert.LIGHT_RESULT_BYTES + RESULT_OVERHEAD_BYTES)
    count = 2 * per_response + 10
    ops = [
        convert.operation_message(WriteMsr(i % VCPUS, msrs.PAT, msrs.PAT_DEFAULT))
        for i in range(count)
    ]
    with serving() as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(VmConfig(vcpus=VCPUS), "fine-grained")
        request = pb.ExecuteRequest(vm_id=vm.vm_id, operations=ops, batch_id=4)
        responses = list(client.stub.Execute(iter([request])))
    assert [len(r.results) for r in responses] == [per_response, per_response, 10]
    assert [r.last for r in responses] == [False, False, True]
    assert {r.batch_id for r in responses} == {4}
    entries = [result.entry for r in responses for result in r.results]
    assert entries == list(range(count))
    assert all(r.ByteSize() <= REPLY_CHUNK_BYTES for r in responses)
