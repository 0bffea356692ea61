"""Fuzz the gRPC server: thousands of random and malformed requests across every RPC (10,000
in the CI profile, 4,000 by default).

A real server runs in-process on ``127.0.0.1:0`` with tight :class:`Limits`, driven by raw
stubs over a real channel; every call has a deadline, so a hang fails instead of blocking. One
seeded :class:`random.Random` (:data:`SEED`) makes a run repeatable; a failure names the seed, the
request's number and the request itself.

What the run checks (one test each, all on the same run):

* every answer is OK, a guest #GP (OK with ``outcome.guest_fault.reason``) or one of the
  documented codes NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED with a
  ``google.rpc.ErrorInfo`` whose reason belongs to that code (gRPC's own RESOURCE_EXHAUSTED for
  an oversized message carries none); never UNKNOWN, INTERNAL, DEADLINE_EXCEEDED or anything
  else; refusals inside an Execute batch likewise;
* the run reached every RPC, every documented non-OK code and some guest #GPs;
* rejected requests change no state (below);
* answers make sense: an access outside every memslot is an MMIO exit, one inside is served by a
  leaf that covers it, and every dumped leaf lies inside the VM's memslots;
* afterwards the server is still SERVING and ordinary requests work.

State and rejected requests. One clean rule: the reference VM (4 vCPUs, one non-coherent DMA
device, 5 GiB of RAM with MTRRs programmed, part of it faulted, zapped and an MMIO marker) is
only ever sent requests that must be rejected: a non-OK status, or an Execute batch in which
every operation is refused. Its full state (GetVm, ReadCounters, ReadVcpuState and host reads
of every MTRR MSR and PAT of every vCPU, DumpLeaves, CheckStaleness, LookupGpa of chosen pages)
is read
before and after the fuzz and must be identical; after each write-like request aimed at it a
cheap probe (counters, leaves, the vCPU state and MSR the request names) pinpoints any request
that changed it.
Its memslots include 1100 tiny device slots (a BAR in every other 4 MiB), many small leaves
for the walks. The other VMs the fuzz creates get random requests; around a
third of the write-like requests to them (and of the CreateVm requests) the same kind of probe
(counters, GetVm, the CR0/MSR named; ListVms for CreateVm) is read before, and again after a
rejection, and must not differ.

Deterministic scenarios end the run: a CreateVm as large as the message limit allows (if the
server refuses to send its answer, the VM must not exist either); an Execute batch of bursts
whose lane results list queued zap ranges, every one of which must arrive; and a DMA attach
past the most a VM holds, refused inside its batch with RESOURCE_EXHAUSTED. Every Execute
answer is checked the same way: each response echoes its batch_id and stays under 1 MiB, the
last is marked, and every operation has its result (one per lane operation for a burst) in
order.

Raw bytes end the file (a test of their own, on a server of their own): hypothesis draws byte
strings, mostly broken protobuf (a truncated or over-long varint, an invalid wire type or a
stray group, a length prefix past the end, invalid UTF-8 in a string field, at the top or
inside nested messages), and each goes as it is to every RPC of the service (from its
descriptor). Bytes that do not decode as the RPC's request are refused with INVALID_ARGUMENT;
bytes that do are answered like any request, never with INTERNAL or UNKNOWN; each call is one
bounded log line and no traceback; and the server stays healthy.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import example, given
from hypothesis import strategies as st

from mtrremu.core import msrs
from mtrremu.core.config import MAX_DMA_DEVICES as MAX_DMA
from mtrremu.rpc.transport import REPLY_CHUNK_BYTES
from mtrremu.server.app import SERVICE_NAME
from mtrremu.server.fairness import StreamLimits
from mtrremu.server.limits import Limits
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc
from tests.helpers import (
    GIB,
    KIB,
    MIB,
    PROFILE,
    RawAnswer,
    call_raw,
    server_log,
    serving,
    var_mask,
)

SEED = 0x6D747272
#: Requests a run sends at least: thorough in CI, enough to reach every RPC and code at a desk.
MIN_REQUESTS = 10_000 if PROFILE == "ci" else 4_000
CALL_TIMEOUT = 10.0
#: The share of mutating requests to the fuzz's own VMs (and of CreateVm requests) whose
#: effect is probed.
SCRATCH_PROBES = 0.25
PAGE = 4 * KIB
U32, U64 = (1 << 32) - 1, (1 << 64) - 1

LIMITS = Limits(
    max_vms=8,
    max_vm_memory_bytes=64 * GIB,
    max_total_memory_bytes=128 * GIB,
    max_batch_operations=500,
    max_message_bytes=1 * MIB,
)
CLIENT_MESSAGE_BYTES = 64 * MIB

Code = grpc.StatusCode
DOCUMENTED_ERRORS = {
    Code.NOT_FOUND: {"VM_NOT_FOUND", "VCPU_NOT_FOUND", "UNKNOWN_STRATEGY"},
    Code.INVALID_ARGUMENT: {
        "INVALID_ARGUMENT",
        "INVALID_VM_CONFIG",
        "HOST_WRITE_REJECTED",
        "SNAPSHOT_INVALID",
    },
    Code.FAILED_PRECONDITION: {"FAILED_PRECONDITION", "STRATEGY_BROKEN"},
    Code.RESOURCE_EXHAUSTED: {"LIMIT_EXCEEDED"},
}
OPERATION_ERRORS = {code.name: reasons for code, reasons in DOCUMENTED_ERRORS.items()}
STATUS_CODES = {code.name: code.value[0] for code in DOCUMENTED_ERRORS}
DOMAIN = "mtrremu.v1"
TRANSPORT_LIMIT = "message larger than max"
RPCS = tuple(pb.DESCRIPTOR.services_by_name["EmulatorService"].methods_by_name)

# Values.
MTRR_MSRS = (msrs.MTRRCAP, msrs.PAT, *msrs.MTRR_MSRS)
NEAR_MSRS = (0, 0x1FF, 0x210, 0x24F, 0x251, 0x257, 0x25A, 0x267, 0x270, 0x276, 0x278, 0x2FE, 0x300)
MTRR_TYPES = (0, 1, 4, 5, 6)
BAD_TYPES = (2, 3, 7, 8, 0x10, 0xFF)
CR0_BITS = (1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 29, 1 << 30)
PE, ET, NW, CD, PG = 1 << 0, 1 << 4, 1 << 29, 1 << 30, 1 << 31
PAT_TYPES, BAD_PAT_TYPES = (0, 1, 4, 5, 6, 7), (2, 3, 8, 0x10, 0xFF)
BAD_ENUMS = (3, 4, 7, 99, 0x7FFFFFFF, -1, -(1 << 31))
EDGE_U32 = (0, 1, 2, 3, 4, 0x7FFFFFFF, 1 << 31, U32, U32 - 1)
EDGE_U64 = (0, 1, 2, U32, 1 << 32, 1 << 63, U64, U64 - 1, U64 - 0xFFF)
ODD_IDS = (
    *("", " vm-1", "vm-1 ", "vm-1\x00", "vm-\u0661", "\u00e9\u4e2d\U0001f600", "vm-1" * 3),
    *("vm-0", "vm-999999", "VM-1", "vm-01", "vm--1", "vm-1.0", "vm-18446744073709551617"),
)
ODD_STRATEGIES = ("FINE-GRAINED", "fine-grained ", "zap_all", "kvm-6.4", "\u00e9", "s" * 600)
ODD_BASES = (0, (1 << 40) - PAGE, 1 << 48, (1 << 52) - PAGE, U64 - 0xFFF)
ODD_SIZES = (PAGE, 2 * MIB, GIB, 0, 70 * GIB, 1 << 40, U64 - 0xFFF)
MAXPHYADDRS = (0, 1, 31, 32, 33, 36, 39, 40, 41, 46, 47, 48, 49, 51, 52, 53, 64, U32)
HOST, GUEST = pb.INITIATOR_HOST, pb.INITIATOR_GUEST

# The reference VM.
REF_VCPUS = 4
REF_BARS = 1100
REF_BAR_BASE = 64 * GIB
REF_MMIO_GPA = 3 * GIB + 512 * MIB
REF_ZAPPED_GPA = 2 * GIB + 64 * MIB
REF_LOOKUPS = (0, PAGE, 512 * MIB, REF_ZAPPED_GPA, 3 * GIB, REF_MMIO_GPA, 4 * GIB, REF_BAR_BASE)

R = TypeVar("R", bound=Message)
Snapshot = dict[str, str]


def short(message: Message, limit: int = 1500) -> str:
    """A message as one line of text, long repeats and long messages cut short."""
    text = text_format.MessageToString(message, as_one_line=True)
    text = re.sub(r"(.)\1{40,}", lambda m: f"{m[1]}<{len(m[0])} times>", text)
    if len(text) > limit:
        return f"{text[:limit]} ... ({message.ByteSize()} bytes in all)"
    return text


def difference(before: str, after: str, context: int = 150) -> str:
    """Where two texts first differ."""
    at = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), None)
    at = min(len(before), len(after)) if at is None else at
    start = max(0, at - context)
    return (
        f"before ...{before[start : at + 2 * context]}...\n"
        f"      after  ...{after[start : at + 2 * context]}..."
    )


@dataclass
class Answer(Generic[R]):
    code: grpc.StatusCode
    response: R | None
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.OK


@dataclass(frozen=True)
class VmInfo:
    """What the fuzz knows of a VM (from the configuration the server echoed)."""

    vm_id: str
    vcpus: int
    maxphyaddr: int
    slots: tuple[tuple[int, int], ...]  # [base, end) gpa, sorted

    @classmethod
    def of(cls, vm: pb.Vm) -> VmInfo:
        slots = sorted((s.base_gpa, s.base_gpa + s.size_bytes) for s in vm.config.memslots)
        return cls(vm.vm_id, vm.config.vcpus, vm.config.guest_maxphyaddr, tuple(slots))

    def slot_of(self, gpa: int) -> tuple[int, int] | None:
        for base, end in self.slots:
            if base <= gpa < end:
                return base, end
        return None

    def covers(self, start: int, end: int) -> bool:
        """Whether every page of ``[start, end)`` is inside some memslot."""
        at = start
        for base, slot_end in self.slots:
            if base <= at < slot_end:
                at = slot_end
            if at >= end:
                return True
        return at >= end


def kind_of(*parts: str) -> str:
    """A problem's kind: its text with numbers and long repeats blurred."""
    text = re.sub(r"(.)\1{15,}", r"\1...", " ".join(parts))
    return re.sub(r"0x[0-9a-f]+|\d+", "#", text)[:160]


class Problems:
    """Problems found, by kind: the first example of each and how often it happened."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.count: Counter[str] = Counter()
        self.rpcs: defaultdict[str, set[str]] = defaultdict(set)

    def add(self, kind: str, text: str, rpc: str = "") -> None:
        self.count[kind] += 1
        self.first.setdefault(kind, text)
        if rpc:
            self.rpcs[kind].add(rpc)

    def __len__(self) -> int:
        return len(self.first)

    def lines(self) -> list[str]:
        return [
            f"({self.count[kind]}x{' in ' if self.rpcs[kind] else ''}"
            f"{', '.join(sorted(self.rpcs[kind]))}) {text}"
            for kind, text in self.first.items()
        ]


@dataclass
class Report:
    seed: int = SEED
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    guest_faults: int = 0
    probes: int = 0
    seconds_per_rpc: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    violations: Problems = field(default_factory=Problems)
    state_changes: Problems = field(default_factory=Problems)
    wrong_answers: Problems = field(default_factory=Problems)
    reference_before: Snapshot = field(default_factory=dict)
    reference_after: Snapshot = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.answers.values())

    def per_code(self) -> Counter[str]:
        codes: Counter[str] = Counter()
        for (_, code), count in self.answers.items():
            codes[code] += count
        return codes

    def per_rpc(self) -> Counter[str]:
        rpcs: Counter[str] = Counter()
        for (rpc, _), count in self.answers.items():
            rpcs[rpc] += count
        return rpcs

    def summary(self) -> str:
        lines = [
            f"seed {self.seed:#x}: {self.total} answers in {self.seconds:.1f} s "
            f"({self.probes} probe calls besides), {self.guest_faults} guest #GPs",
            "  per code: " + ", ".join(f"{c} {n}" for c, n in sorted(self.per_code().items())),
            "  per RPC: " + ", ".join(f"{r} {n}" for r, n in sorted(self.per_rpc().items())),
            "  Execute operations: "
            + ", ".join(f"{k} {n}" for k, n in sorted(self.operations.items())),
            "  seconds per RPC (probes included): "
            + ", ".join(
                f"{r} {t:.1f}" for r, t in sorted(self.seconds_per_rpc.items(), key=lambda i: -i[1])
            ),
        ]
        return "\n".join(lines)


def listing(problems: Sequence[str], report: Report, limit: int = 25) -> str:
    shown = "\n".join(f"- {p}" for p in problems[:limit])
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problem(s), seed {report.seed:#x}:\n{shown}{more}\n{report.summary()}"


class Fuzzer:
    """Sends the requests, checks each answer, and keeps the books."""

    def __init__(self, stub: pb_grpc.EmulatorServiceStub, rng: random.Random) -> None:
        self.stub = stub
        self.rng = rng
        self.report = Report()
        self.request_no = 0
        self.scratch: dict[str, VmInfo] = {}
        #: The last few snapshots ExportVm gave, for ImportVm.
        self.exports: list[bytes] = []
        self.gone: list[str] = []
        self.strategies: list[str] = []
        self.ref = VmInfo("", 0, 0, ())
        self.ref_state: Snapshot = {}
        #: The operations of the last Execute stream refused with RESOURCE_EXHAUSTED.
        self.exhausted: list[str] = []

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    # -- calls -------------------------------------------------------------------------

    def where(self) -> str:
        return f"[seed {SEED:#x}, request #{self.request_no}]"

    def violation(self, rpc: str, request: Message, what: str) -> None:
        self.report.violations.add(
            kind_of(what[:120]), f"{self.where()} {rpc}: {what}\n    request: {short(request)}", rpc
        )

    def unary(
        self, rpc: str, request: Message, response_type: type[R], *, probe: bool = False
    ) -> Answer[R]:
        """One unary call (or DumpLeaves and ExportVm, whose responses are folded into one;
        or ImportVm, whose one request is its stream)."""
        if probe:
            self.report.probes += 1
        else:
            self.request_no += 1
        method = getattr(self.stub, rpc)
        started = time.perf_counter()
        try:
            if rpc == "DumpLeaves":
                merged = pb.DumpLeavesResponse()
                for part in method(request, timeout=CALL_TIMEOUT):
                    merged.runs.extend(part.runs)
                response = cast(R, merged)
            elif rpc == "ExportVm":
                chunks = [part.data for part in method(request, timeout=CALL_TIMEOUT)]
                response = cast(R, pb.ExportVmResponse(data=b"".join(chunks)))
            elif rpc == "ImportVm":
                response = cast(R, method(iter([request]), timeout=CALL_TIMEOUT))
            else:
                response = cast(R, method(request, timeout=CALL_TIMEOUT))
        except grpc.RpcError as error:
            answer: Answer[R] = self.failed(rpc, request, error)
        else:
            answer = Answer(Code.OK, response)
        self.report.seconds_per_rpc[rpc] += time.perf_counter() - started
        if not probe:
            self.report.answers[rpc, answer.code.name] += 1
        return answer

    def failed(self, rpc: str, request: Message, error: grpc.RpcError) -> Answer[R]:
        assert isinstance(error, grpc.Call)
        code, details = error.code(), error.details() or ""
        reasons = DOCUMENTED_ERRORS.get(code)
        if reasons is None:
            self.violation(rpc, request, f"answered {code.name}: {details[:500]}")
            return Answer(code, None, details)
        if code is Code.RESOURCE_EXHAUSTED and TRANSPORT_LIMIT in details:
            return Answer(code, None, details)  # gRPC's own message limit: no ErrorInfo
        try:
            status = rpc_status.from_call(error)
        except ValueError as mismatch:
            self.violation(rpc, request, f"{code.name} with an inconsistent status: {mismatch}")
            return Answer(code, None, details)
        found = set()
        for detail in [] if status is None else status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                found.add(info.reason)
        if len(found) != 1 or not found <= reasons:
            self.violation(
                rpc, request, f"{code.name} ({details[:200]}) with ErrorInfo reasons {found}"
            )
        return Answer(code, None, details)

    def execute(
        self, requests: Sequence[pb.ExecuteRequest], vms: dict[str, VmInfo]
    ) -> tuple[Answer[pb.ExecuteResponse], list[list[pb.OperationResult]]]:
        """One Execute stream; the results of each batch answered in full (a batch may take
        several responses, the last marked), checked against its batch."""
        self.request_no += 1
        self.exhausted = []
        answered: list[list[pb.OperationResult]] = []
        stream = pb.ExecuteRequest()
        if requests:
            stream.CopyFrom(requests[0])
        started = time.perf_counter()
        pending = iter(requests)
        current: list[pb.OperationResult] = []
        request = next(pending, None)
        try:
            for response in self.stub.Execute(iter(requests), timeout=CALL_TIMEOUT):
                if request is None:
                    self.violation("Execute", stream, "a response after every batch was answered")
                    break
                if response.batch_id != request.batch_id:
                    self.violation("Execute", request, f"batch_id {response.batch_id} echoed")
                if response.ByteSize() > REPLY_CHUNK_BYTES:
                    self.violation("Execute", request, f"a {response.ByteSize()}-byte response")
                current.extend(response.results)
                if response.last:
                    self.check_batch(request, current, vms.get(request.vm_id))
                    answered.append(current)
                    current, request = [], next(pending, None)
        except grpc.RpcError as error:
            answer: Answer[pb.ExecuteResponse] = self.failed("Execute", stream, error)
        else:
            answer = Answer(Code.OK, None)
            if len(answered) != len(requests):
                self.violation(
                    "Execute", stream, f"{len(requests)} batches, {len(answered)} answered"
                )
        self.report.seconds_per_rpc["Execute"] += time.perf_counter() - started
        self.report.answers["Execute", answer.code.name] += 1
        return answer, answered

    def check_batch(
        self, request: pb.ExecuteRequest, results: list[pb.OperationResult], vm: VmInfo | None
    ) -> None:
        """Every entry answered in order: one result, or one per lane operation of a burst."""
        by_entry: dict[int, list[pb.OperationResult]] = defaultdict(list)
        for result in results:
            by_entry[result.entry].append(result)
        entries = [r.entry for r in results]
        if entries != sorted(entries) or set(by_entry) != set(range(len(request.operations))):
            self.violation(
                "Execute",
                request,
                f"{len(request.operations)} operations answered for entries "
                f"{sorted(set(entries))[:20]}",
            )
            return
        for index, op in enumerate(request.operations):
            where = f"batch {request.batch_id} op {index}"
            self.check_entry(request, op, by_entry[index], vm, where)

    def check_entry(
        self,
        request: pb.ExecuteRequest,
        op: pb.Operation,
        results: list[pb.OperationResult],
        vm: VmInfo | None,
        path: str,
    ) -> None:
        first = results[0]
        if op.WhichOneof("kind") != "burst" or not first.HasField("lane"):
            if len(results) != 1 or first.HasField("lane"):
                self.violation("Execute", request, f"{path}: {len(results)} results, not 1")
                return
            self.check_result(request, op, first, vm, path)
            return
        self.report.operations["burst"] += 1
        expected = [
            (lane.vcpu, index, lane_op)
            for lane in op.burst.lanes
            for index, lane_op in enumerate(lane.operations)
        ]
        got = [(r.lane.vcpu, r.lane.index) for r in results]
        if got != [(vcpu, index) for vcpu, index, _ in expected]:
            self.violation("Execute", request, f"{path}: burst results at {got[:20]}")
            return
        for (vcpu, index, lane_op), one in zip(expected, results, strict=True):
            self.check_result(request, lane_op, one, vm, f"{path} lane {vcpu} op {index}")

    def check_result(
        self,
        request: pb.ExecuteRequest,
        op: pb.Operation,
        result: pb.OperationResult,
        vm: VmInfo | None,
        path: str,
    ) -> None:
        kinds = [name for name in ("outcome", "error") if result.HasField(name)]
        if len(kinds) != 1:
            self.violation("Execute", request, f"{path}: result holds {kinds}")
            return
        if result.HasField("error"):
            error = result.error
            self.report.operations[f"error {error.status}"] += 1
            if error.status == "RESOURCE_EXHAUSTED":
                self.exhausted.append(f"{path} ({short(op)}): {error.message}")
            if error.reason not in OPERATION_ERRORS.get(error.status, set()):
                self.violation(
                    "Execute", request, f"operation refused with {error.status}/{error.reason}"
                )
            if error.code != STATUS_CODES.get(error.status):
                self.violation(
                    "Execute", request, f"error code {error.code} with status {error.status}"
                )
            return
        self.report.operations["outcome"] += 1
        self.count_fault(result.outcome)
        if op.WhichOneof("kind") == "access_gpa" and vm is not None:
            self.check_access(request, vm, op.access_gpa.gpa, result.outcome)

    def count_fault(self, outcome: pb.EventOutcome) -> None:
        if outcome.guest_fault.reason:
            self.report.guest_faults += 1

    def check_access(
        self, request: Message, vm: VmInfo, gpa: int, outcome: pb.EventOutcome
    ) -> None:
        """An access outside every memslot is an MMIO exit; one inside is served by a leaf that
        covers it."""
        page = gpa & ~(PAGE - 1)
        access = outcome.access
        if vm.slot_of(page) is None:
            if access.kind != pb.ACCESS_KIND_MMIO_EXIT:
                self.report.wrong_answers.add(
                    "an access outside every memslot not answered as MMIO",
                    f"{self.where()} gpa {gpa:#x} is outside every memslot of {vm.vm_id} "
                    f"(MAXPHYADDR {vm.maxphyaddr}, slots {fmt_slots(vm)}) but the access "
                    f"answered {short(access)}\n    request: {short(request)}",
                )
            return
        size = {pb.LEVEL_4K: PAGE, pb.LEVEL_2M: 2 * MIB, pb.LEVEL_1G: GIB}.get(
            access.mapping.level, 0
        )
        base = access.mapping.base_gpa
        if access.kind not in (pb.ACCESS_KIND_HIT, pb.ACCESS_KIND_FAULT) or not (
            base <= page < base + size
        ):
            self.report.wrong_answers.add(
                "an access inside a memslot not served by a leaf covering it",
                f"{self.where()} gpa {gpa:#x} of {vm.vm_id} is RAM/device memory but the access "
                f"answered {short(access)}\n    request: {short(request)}",
            )

    def check_leaves(self, request: Message, vm: VmInfo, runs: Sequence[pb.LeafRun]) -> None:
        for run in runs:
            size = {pb.LEVEL_4K: PAGE, pb.LEVEL_2M: 2 * MIB, pb.LEVEL_1G: GIB}.get(run.level, 0)
            end = run.start_gpa + run.leaves * size
            if not size or not vm.covers(run.start_gpa, end):
                self.report.wrong_answers.add(
                    "DumpLeaves lists leaves outside the memslots",
                    f"{self.where()} DumpLeaves of {vm.vm_id} (MAXPHYADDR {vm.maxphyaddr}, slots "
                    f"{fmt_slots(vm)}) lists leaves outside its memslots: {short(run)}"
                    f"\n    after request: {short(request)}",
                )
                return

    # -- probes: the state a request may not change if it is rejected ------------------------

    def read(self, rpc: str, request: Message, response_type: type[R]) -> str:
        answer = self.unary(rpc, request, response_type, probe=True)
        if answer.response is None:
            return f"{answer.code.name}: {answer.details}"
        return "OK: " + text_format.MessageToString(answer.response, as_one_line=True)

    def probe(
        self,
        vm: VmInfo,
        *,
        vcpu: int | None = None,
        msr: int | None = None,
        describe: bool = True,
        leaves: bool = True,
    ) -> Snapshot:
        """Cheap state: the counters, the VM message (its DMA count and leaf counts) and/or the
        leaves, plus the CR0 and MSR the request names."""
        snap: Snapshot = {}
        if describe:
            snap["GetVm"] = self.read("GetVm", pb.GetVmRequest(vm_id=vm.vm_id), pb.GetVmResponse)
        snap["ReadCounters"] = self.read(
            "ReadCounters", pb.ReadCountersRequest(vm_id=vm.vm_id), pb.ReadCountersResponse
        )
        if leaves:
            snap["DumpLeaves"] = self.read(
                "DumpLeaves", pb.DumpLeavesRequest(vm_id=vm.vm_id), pb.DumpLeavesResponse
            )
        if vcpu is not None and 0 <= vcpu < vm.vcpus:
            snap[f"ReadVcpuState {vcpu}"] = self.read_vcpu_state(vm.vm_id, vcpu)
            if msr is not None and msr in msrs.EMULATED_MSRS:
                snap[f"ReadMsr {vcpu} {msr:#x}"] = self.read_msr(vm.vm_id, vcpu, msr)
        return snap

    def read_vcpu_state(self, vm_id: str, vcpu: int) -> str:
        op = pb.ReadVcpuStateOperation(vcpu=vcpu)
        return self.read(
            "ReadVcpuState",
            pb.ReadVcpuStateRequest(vm_id=vm_id, operation=op),
            pb.ReadVcpuStateResponse,
        )

    def read_msr(self, vm_id: str, vcpu: int, msr: int) -> str:
        op = pb.ReadMsrOperation(vcpu=vcpu, msr=msr, initiator=HOST)
        return self.read(
            "ReadMsr", pb.ReadMsrRequest(vm_id=vm_id, operation=op), pb.ReadMsrResponse
        )

    def reference_snapshot(self) -> Snapshot:
        """Everything observable of the reference VM."""
        ref = self.ref.vm_id
        snap = self.probe(self.ref)
        snap["DumpLeaves by 3"] = self.read(
            "DumpLeaves", pb.DumpLeavesRequest(vm_id=ref, runs_per_message=3), pb.DumpLeavesResponse
        )
        for vcpu in range(REF_VCPUS):
            snap[f"ReadVcpuState {vcpu}"] = self.read_vcpu_state(ref, vcpu)
            for msr in MTRR_MSRS:
                snap[f"ReadMsr {vcpu} {msr:#x}"] = self.read_msr(ref, vcpu, msr)
            snap[f"CheckStaleness {vcpu}"] = self.read(
                "CheckStaleness",
                pb.CheckStalenessRequest(
                    vm_id=ref, operation=pb.CheckStalenessOperation(vcpu=vcpu)
                ),
                pb.CheckStalenessResponse,
            )
        snap["CheckStaleness at quiescence"] = self.read(
            "CheckStaleness",
            pb.CheckStalenessRequest(
                vm_id=ref, operation=pb.CheckStalenessOperation(at_quiescence=True)
            ),
            pb.CheckStalenessResponse,
        )
        for gpa in REF_LOOKUPS:
            snap[f"LookupGpa {gpa:#x}"] = self.read(
                "LookupGpa",
                pb.LookupGpaRequest(vm_id=ref, operation=pb.LookupGpaOperation(gpa=gpa)),
                pb.LookupGpaResponse,
            )
        return snap

    def compare(self, what: str, request: Message, before: Snapshot, after: Snapshot) -> None:
        changed = sorted(key for key in before if after.get(key) != before[key])
        if not changed:
            return
        text = f"{self.where()} {what} changed {', '.join(changed)}\n    request: {short(request)}"
        if isinstance(request, pb.ExecuteRequest) and self.exhausted:
            text += "\n    refused with RESOURCE_EXHAUSTED: " + "\n      ".join(self.exhausted[:3])
        for key in changed[:3]:
            text += f"\n    {key}: {difference(before[key], after.get(key, ''))}"
        self.report.state_changes.add(kind_of(what, type(request).DESCRIPTOR.name, *changed), text)

    def guarded(
        self,
        vm: VmInfo,
        request: Message,
        send: Callable[[], bool],
        *,
        vcpu: int | None = None,
        msr: int | None = None,
        always: bool = False,
        reads: bool = False,
    ) -> None:
        """Send a request; ``send`` says whether it was rejected. The reference VM must reject
        it, and its probed state must stay as it was (``reads``: a read, left to the closing
        snapshot). For the fuzz's own VMs a share of the requests (``always``: this one) is
        probed before and, if rejected, after: the two must agree."""
        if vm.vm_id == self.ref.vm_id:
            rejected = send()
            if not rejected:
                self.violation(
                    type(request).DESCRIPTOR.name,
                    request,
                    "the reference VM accepted a request "
                    "built to be refused (this fuzz only sends it requests that must fail)",
                )
            if reads:
                return  # the closing snapshot covers reads
            after = self.probe(vm, vcpu=vcpu, msr=msr, describe=False)
            before = {key: self.ref_state[key] for key in after}
            self.compare(f"a rejected request: the reference VM {vm.vm_id}", request, before, after)
            self.ref_state.update(after)  # report each change once
            return
        if vm.vm_id not in self.scratch or not (always or self.chance(SCRATCH_PROBES)):
            send()
            return
        before = self.probe(vm, vcpu=vcpu, msr=msr, leaves=always)
        if send():
            self.compare(
                f"a rejected request: VM {vm.vm_id}",
                request,
                before,
                self.probe(vm, vcpu=vcpu, msr=msr, leaves=always),
            )


def fmt_slots(vm: VmInfo) -> str:
    shown = ", ".join(f"[{b:#x}, {e:#x})" for b, e in vm.slots[:6])
    return shown + (f" and {len(vm.slots) - 6} more" if len(vm.slots) > 6 else "")


# Enum fields take any int32 on the wire; these casts let the fuzz send unknown values.
def initiator(value: int) -> pb.Initiator.ValueType:
    return cast(pb.Initiator.ValueType, value)


def level(value: int) -> pb.Level.ValueType:
    return cast(pb.Level.ValueType, value)


def precedence(value: int) -> pb.Precedence.ValueType:
    return cast(pb.Precedence.ValueType, value)


def slot_kind(value: int) -> pb.MemslotKind.ValueType:
    return cast(pb.MemslotKind.ValueType, value)


def reference_config() -> pb.VmConfig:
    bars = [
        pb.Memslot(
            base_gpa=REF_BAR_BASE + k * 4 * MIB + 2 * MIB - PAGE,
            size_bytes=2 * PAGE,
            kind=pb.MEMSLOT_KIND_DEVICE,
        )
        for k in range(REF_BARS)
    ]
    return pb.VmConfig(
        vcpus=REF_VCPUS,
        noncoherent_dma=1,
        memslots=[
            pb.Memslot(base_gpa=0, size_bytes=640 * KIB, name="low"),
            pb.Memslot(base_gpa=MIB, size_bytes=3 * GIB - MIB, name="ram"),
            pb.Memslot(base_gpa=3 * GIB, size_bytes=16 * MIB, kind=pb.MEMSLOT_KIND_DEVICE),
            pb.Memslot(base_gpa=4 * GIB, size_bytes=2 * GIB, name="high"),
            *bars,
        ],
    )


class Campaign(Fuzzer):
    """The generators and the run."""

    # -- values ------------------------------------------------------------------------

    def u64(self) -> int:
        rng = self.rng
        kind = rng.randrange(11)
        if kind == 0:
            return rng.choice(EDGE_U64)
        if kind == 1:
            return 1 << rng.randint(0, 63)
        if kind == 2:
            return (1 << rng.randint(32, 53)) - rng.choice((0, 1, PAGE))
        if kind == 3:
            return rng.getrandbits(rng.randint(1, 64))
        if kind == 4:
            return rng.randrange(64) * PAGE
        return rng.getrandbits(64)

    def u32(self) -> int:
        return self.rng.choice((*EDGE_U32, self.rng.getrandbits(32), self.rng.randint(0, 64)))

    def bad_vcpu(self, vm: VmInfo) -> int:
        n = vm.vcpus
        return min(
            U32, self.rng.choice((n, n + 1, n + self.rng.randint(2, 200), 4096, 1 << 31, U32))
        )

    def vcpu(self, vm: VmInfo) -> int:
        if vm.vcpus and self.chance(0.85):
            return self.rng.randrange(vm.vcpus)
        return self.bad_vcpu(vm)

    def initiator(self) -> pb.Initiator.ValueType:
        if self.chance(0.9):
            return initiator(self.rng.choice((0, 1, 2, 2)))
        return initiator(self.rng.choice(BAD_ENUMS))

    def msr(self) -> int:
        roll = self.rng.random()
        if roll < 0.7:
            return self.rng.choice(MTRR_MSRS)
        if roll < 0.85:
            return self.rng.choice(NEAR_MSRS)
        return self.u32()

    def unknown_msr(self) -> int:
        while True:
            msr = self.rng.choice((*NEAR_MSRS, self.u32(), 0xC0000080, 0x10, 0x1B))
            if msr not in msrs.EMULATED_MSRS:
                return msr

    def type_bytes(self, legal: Sequence[int], spoil: bool, bad: Sequence[int] = BAD_TYPES) -> int:
        raw = [self.rng.choice(legal) for _ in range(8)]
        if spoil:
            raw[self.rng.randrange(8)] = self.rng.choice(bad)
        return int.from_bytes(bytes(raw), "little")

    def msr_value(self, msr: int, maxphyaddr: int, valid: bool | None = None) -> int:
        """A value for ``msr``: one KVM accepts, one it refuses (reserved bits, illegal types,
        bits above MAXPHYADDR), or anything."""
        rng = self.rng
        if valid is None:
            if self.chance(0.15):
                return self.u64()
            valid = self.chance(0.6)
        high = 1 << rng.randint(maxphyaddr, 63)
        if msr == msrs.DEFTYPE:
            if valid:
                return rng.choice(MTRR_TYPES) | rng.choice((0, 0x400, 0x800, 0xC00))
            reserved = 0xC06 | 1 << rng.choice((8, 9, 12, 31, 63))
            return rng.choice((rng.choice(BAD_TYPES) | 0xC00, reserved, 0xC06 | high))
        if msrs.is_fixed_msr(msr):
            return self.type_bytes(MTRR_TYPES, spoil=not valid)
        if msr == msrs.PAT:
            return self.type_bytes(PAT_TYPES, spoil=not valid, bad=BAD_PAT_TYPES)
        if msrs.is_var_msr(msr):
            size = 1 << rng.randint(12, maxphyaddr - 1)
            if (msr - msrs.PHYSBASE0) % 2 == 0:
                base = rng.randrange(1 << (maxphyaddr - 12)) << 12 & ~(size - 1)
                if valid:
                    return base | rng.choice(MTRR_TYPES)
                reserved = base | 0x100 << rng.randrange(4)
                return rng.choice((base | rng.choice(BAD_TYPES), reserved, base | high))
            mask = var_mask(size, maxphyaddr)
            if valid:
                return rng.choice((mask, mask & ~msrs.PHYSMASK_VALID, 0))
            return rng.choice((mask | 1 << rng.randrange(11), mask | high, U64))
        return self.u64()

    def cr0_value(self, valid: bool | None = None) -> int:
        rng = self.rng
        if valid is None:
            if self.chance(0.1):
                return self.u64()
            valid = self.chance(0.75)
        value = ET
        for bit in CR0_BITS:
            if self.chance(0.4):
                value |= bit
        if self.chance(0.5):
            value |= PE | (PG if self.chance(0.5) else 0)
        if valid:
            return value | CD if value & NW else value
        high = 1 << rng.randint(32, 63)
        return rng.choice((value | high, (value | NW) & ~CD, (value | PG) & ~PE, U64))

    def gpa(self, vm: VmInfo) -> int:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55 and vm.slots:
            base, end = rng.choice(vm.slots)
            size = end - base
            return base + rng.choice((0, size - 1, size - PAGE, rng.randrange(max(1, size))))
        if roll < 0.75 and vm.slots:
            base, end = rng.choice(vm.slots)
            return rng.choice((end, end + PAGE, base - PAGE, base - 1)) % (1 << 64)
        if roll < 0.8 and vm.slots:  # memory seen through bit 48 (beyond a 4-level EPT)
            base, end = rng.choice(vm.slots)
            return (1 << 48) + base + rng.randrange(max(1, end - base))
        edge = 1 << vm.maxphyaddr
        odd = (edge - PAGE, edge - 1, edge, edge + PAGE, 1 << 48, 1 << 52, (1 << 52) - PAGE)
        return rng.choice((*odd, self.u64()))

    def gpa_range(self, vm: VmInfo) -> tuple[int, int]:
        """Page-aligned ranges inside memslots; the whole space; empty, inverted, unaligned,
        beyond MAXPHYADDR, huge and random ones."""
        rng = self.rng
        roll = rng.random()
        space = 1 << vm.maxphyaddr
        if roll < 0.5 and vm.slots:
            base, end = rng.choice(vm.slots)
            start = base + rng.randrange(max(1, (end - base) // PAGE)) * PAGE
            stop = min(end, start + rng.choice((PAGE, 2 * MIB, 64 * MIB, GIB, 8 * GIB)))
            return start, max(stop, start + PAGE)
        if roll < 0.6:
            return 0, space
        if roll < 0.7:
            start = rng.randrange(1 << (vm.maxphyaddr - 12)) * PAGE
            return start, max(0, start - rng.choice((0, PAGE, GIB)))
        if roll < 0.8:
            start = rng.randrange(1 << 20) * PAGE
            return start + rng.choice((0, 1, 0x800)), start + GIB + rng.choice((0, 7, 0xFFF))
        odd = ((space - PAGE, space + PAGE), (0, 1 << 52), (0, U64 - 0xFFF), (U64 - 0xFFF, 0))
        return rng.choice((*odd, (self.u64(), self.u64())))

    def unknown_id(self) -> str:
        """An id no VM has: odd spellings, deleted VMs, unicode, long (and very long) ones."""
        rng = self.rng
        live = {self.ref.vm_id, *self.scratch}
        while True:
            roll = rng.randrange(20)
            if roll < 12:
                vm_id = rng.choice(ODD_IDS)
            elif roll < 14 and self.gone:
                vm_id = rng.choice(self.gone[-5:])
            elif roll < 16:
                vm_id = "".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(1, 30)))
            elif roll < 19:
                vm_id = "x" * rng.randint(100, 1000)
            else:
                vm_id = "y" * rng.randint(40_000, 60_000)  # over gRPC's metadata limit if echoed
            if vm_id not in live:
                return vm_id

    def phantom(self) -> VmInfo:
        """A VM that does not exist, for generating the rest of a request."""
        return VmInfo(self.unknown_id(), self.rng.randint(1, 8), 40, ((0, 4 * GIB),))

    def pick(self, *, reference: bool = True) -> VmInfo:
        """The reference VM, a VM the fuzz created, or an unknown one."""
        roll = self.rng.random()
        if reference and roll < 0.15:
            return self.ref
        if self.scratch and roll < 0.85:
            return self.rng.choice(list(self.scratch.values()))
        return self.phantom()

    # -- configurations ----------------------------------------------------------------

    def memslot(self, maxphyaddr: int) -> pb.Memslot:
        """A slot with anything in it: unaligned, empty, overlapping, beyond MAXPHYADDR, huge."""
        rng = self.rng
        anywhere = rng.randrange(1 << min(max(1, maxphyaddr - 12), 52)) * PAGE
        unaligned = rng.randrange(1 << 20) * PAGE + rng.choice((1, 0x800, 0xFFF))
        base = rng.choice((*ODD_BASES, rng.randint(0, 8) * GIB, anywhere, unaligned, self.u64()))
        sizes = (rng.randint(1, 16) * GIB, rng.randint(1, 4096) * PAGE, rng.randint(1, 1 << 20))
        size = rng.choice((*ODD_SIZES, *sizes, self.u64()))
        kind = rng.choice((0, 1, 2, 0, 1, 2, *BAD_ENUMS))
        name = rng.choice(("", "ram", "bar0", "\u00e9\u4e2d", "n" * rng.randint(1, 500)))
        return pb.Memslot(base_gpa=base, size_bytes=size, kind=slot_kind(kind), name=name)

    def layout(self) -> list[pb.Memslot]:
        """Non-overlapping aligned slots: most of these configurations are valid."""
        rng = self.rng
        slots = []
        cursor = 0
        for _ in range(rng.randint(1, 5)):
            cursor += rng.choice((0, PAGE, 2 * MIB, GIB, rng.randint(0, 64) * MIB))
            size = rng.choice((PAGE, 2 * MIB, 64 * MIB, GIB, 2 * GIB, rng.randint(1, 3072) * MIB))
            kind = pb.MEMSLOT_KIND_DEVICE if self.chance(0.2) else pb.MEMSLOT_KIND_RAM
            slots.append(pb.Memslot(base_gpa=cursor, size_bytes=size, kind=kind))
            cursor += size
        if self.chance(0.05):  # over the per-VM memory limit
            slots.append(pb.Memslot(base_gpa=cursor, size_bytes=rng.randint(50, 70) * GIB))
        return slots

    def vm_config(self) -> pb.VmConfig:
        rng = self.rng
        config = pb.VmConfig()
        roll = rng.random()
        if roll < 0.8:
            config.vcpus = rng.randint(0, 8)
        elif roll < 0.9:
            config.vcpus = rng.choice((16, 64, 4096, 4097, 5000, U32))
        else:
            config.vcpus = rng.randint(0, 5000)
        if self.chance(0.5):
            config.guest_maxphyaddr = rng.choice(MAXPHYADDRS)
        maxphyaddr = config.guest_maxphyaddr if config.HasField("guest_maxphyaddr") else 40
        roll = rng.random()
        if roll < 0.45:
            config.memslots.extend(self.layout())
        elif roll < 0.75:
            config.memslots.extend(self.memslot(maxphyaddr) for _ in range(rng.randint(1, 4)))
        config.noncoherent_dma = rng.choice(
            (0, 1, 1, 2) if self.chance(0.85) else (3, MAX_DMA - 1, MAX_DMA, MAX_DMA + 1, U32)
        )
        for name in ("quirk_cd_nw_cleared", "feature_mtrr", "tdp"):
            if self.chance(0.3):
                setattr(config, name, self.chance(0.5))
        config.max_mapping_level = level(
            rng.choice((0, 1, 2, 3) if self.chance(0.9) else BAD_ENUMS)
        )
        config.precedence = precedence(rng.choice((0, 1, 2) if self.chance(0.9) else BAD_ENUMS))
        config.zap_list_posted_window = self.chance(0.1)
        return config

    def strategy(self) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return ""
        if roll < 0.85 and self.strategies:
            return self.rng.choice(self.strategies)
        return self.rng.choice(ODD_STRATEGIES)

    # -- operations ----------------------------------------------------------------------

    def write_msr_op(self, vm: VmInfo, vcpu: int | None = None) -> pb.WriteMsrOperation:
        msr = self.msr()
        return pb.WriteMsrOperation(
            vcpu=self.vcpu(vm) if vcpu is None else vcpu,
            msr=msr,
            value=self.msr_value(msr, vm.maxphyaddr),
            initiator=self.initiator(),
        )

    def read_msr_op(self, vm: VmInfo, vcpu: int | None = None) -> pb.ReadMsrOperation:
        return pb.ReadMsrOperation(
            vcpu=self.vcpu(vm) if vcpu is None else vcpu,
            msr=self.msr(),
            initiator=self.initiator(),
        )

    def write_cr0_op(self, vm: VmInfo, vcpu: int | None = None) -> pb.WriteCr0Operation:
        return pb.WriteCr0Operation(
            vcpu=self.vcpu(vm) if vcpu is None else vcpu,
            value=self.cr0_value(),
            initiator=self.initiator(),
        )

    def fault_range_op(self, vm: VmInfo, vcpu: int | None = None) -> pb.FaultRangeOperation:
        start, end = self.gpa_range(vm)
        return pb.FaultRangeOperation(
            vcpu=self.vcpu(vm) if vcpu is None else vcpu, start_gpa=start, end_gpa=end
        )

    def operation(self, vm: VmInfo, vcpu: int | None = None, *, burst: bool = True) -> pb.Operation:
        """Any operation with random fields (``vcpu``: one lane's, where it applies)."""
        roll = self.rng.randrange(100)
        v = self.vcpu(vm) if vcpu is None else vcpu
        if roll < 25:
            return pb.Operation(write_msr=self.write_msr_op(vm, vcpu))
        if roll < 35:
            return pb.Operation(read_msr=self.read_msr_op(vm, vcpu))
        if roll < 50:
            return pb.Operation(write_cr0=self.write_cr0_op(vm, vcpu))
        if roll < 54:
            return pb.Operation(reset_vcpu=pb.ResetVcpuOperation(vcpu=v))
        if roll < 58:
            return pb.Operation(init_vcpu=pb.InitVcpuOperation(vcpu=v))
        if roll < 75:
            return pb.Operation(access_gpa=pb.AccessGpaOperation(vcpu=v, gpa=self.gpa(vm)))
        if roll < 84:
            return pb.Operation(fault_range=self.fault_range_op(vm, vcpu))
        if roll < 88:
            return pb.Operation(attach_dma=pb.AttachDmaOperation())
        if roll < 92:
            return pb.Operation(detach_dma=pb.DetachDmaOperation())
        if roll < 93:
            return pb.Operation()
        if roll < 97:
            return self.read_operation(vm, v)
        if roll < 98:
            return pb.Operation(write_msrs=self.write_msrs_op(vm, vcpu))
        if burst:
            return pb.Operation(burst=self.burst(vm))
        return self.operation(vm, vcpu, burst=False)

    def read_operation(self, vm: VmInfo, vcpu: int) -> pb.Operation:
        """A read: whole-vCPU state, a lookup, the counters or the oracle."""
        roll = self.rng.randrange(4)
        if roll == 0:
            return pb.Operation(read_vcpu_state=pb.ReadVcpuStateOperation(vcpu=vcpu))
        if roll == 1:
            return pb.Operation(lookup_gpa=pb.LookupGpaOperation(gpa=self.gpa(vm)))
        if roll == 2:
            return pb.Operation(read_counters=pb.ReadCountersOperation())
        op = pb.CheckStalenessOperation(vcpu=vcpu, at_quiescence=self.chance(0.3))
        return pb.Operation(check_staleness=op)

    def write_msrs_op(self, vm: VmInfo, vcpu: int | None = None) -> pb.WriteMsrsOperation:
        """Up to 24 host writes of random MSRs, mostly valid values (so some write them all)."""
        op = pb.WriteMsrsOperation(vcpu=self.vcpu(vm) if vcpu is None else vcpu)
        for _ in range(self.rng.choice((0, 1, 2, 5, 12, 24))):
            msr = self.msr()
            valid = self.chance(0.9)
            op.msrs.add(msr=msr, value=self.msr_value(msr, vm.maxphyaddr, valid=valid))
        return op

    def burst(self, vm: VmInfo) -> pb.Burst:
        """Lanes of random operations, sometimes malformed: duplicate or unknown lanes, another
        vCPU's operation in a lane, DMA or a nested burst in a lane, empty operations."""
        rng = self.rng
        message = pb.Burst(seed=self.u64())
        for _ in range(rng.choice((0, 1, 2, 2, 3, 4, 6))):
            vcpu = self.vcpu(vm)
            ops = [self.operation(vm, vcpu, burst=False) for _ in range(rng.randint(0, 8))]
            ops = [
                op
                for op in ops
                if op.WhichOneof("kind") not in ("attach_dma", "detach_dma") or self.chance(0.2)
            ]
            if ops and self.chance(0.05):
                ops[rng.randrange(len(ops))] = pb.Operation(burst=pb.Burst(seed=1))
            if ops and self.chance(0.05):
                ops[rng.randrange(len(ops))] = self.operation(vm, self.vcpu(vm), burst=False)
            message.lanes.add(vcpu=vcpu, operations=ops)
        if message.lanes and self.chance(0.05):
            message.lanes.add().CopyFrom(message.lanes[0])
        return message

    def plausible(self, vm: VmInfo, vcpu: int) -> pb.Operation:
        """An operation that would normally take effect."""
        rng = self.rng
        roll = rng.randrange(6)
        if roll == 0:
            msr = rng.choice(msrs.MTRR_MSRS)
            return pb.Operation(
                write_msr=pb.WriteMsrOperation(
                    vcpu=vcpu,
                    msr=msr,
                    value=self.msr_value(msr, vm.maxphyaddr, valid=True),
                    initiator=rng.choice((GUEST, HOST)),
                )
            )
        if roll == 1:
            value = rng.choice((ET | PE, ET | PE | CD, ET | PE | CD | NW, 0x80000011))
            return pb.Operation(write_cr0=pb.WriteCr0Operation(vcpu=vcpu, value=value))
        if roll == 2:
            return pb.Operation(reset_vcpu=pb.ResetVcpuOperation(vcpu=vcpu))
        if roll == 3:
            gpa = rng.randrange(5 * GIB)
            return pb.Operation(access_gpa=pb.AccessGpaOperation(vcpu=vcpu, gpa=gpa))
        if roll == 4:
            start = rng.randrange(1 << 18) * PAGE
            return pb.Operation(
                fault_range=pb.FaultRangeOperation(vcpu=vcpu, start_gpa=start, end_gpa=start + GIB)
            )
        return pb.Operation(init_vcpu=pb.InitVcpuOperation(vcpu=vcpu))

    # -- requests the reference VM must refuse -------------------------------------------

    def refused_write_msr(self) -> pb.WriteMsrOperation:
        rng, ref = self.rng, self.ref
        roll = rng.randrange(4)
        msr = rng.choice(MTRR_MSRS)
        if roll == 0:  # a host write KVM refuses
            if self.chance(0.2):
                msr = rng.choice((msrs.MTRRCAP, self.unknown_msr()))
            value = self.msr_value(msr, ref.maxphyaddr, valid=False)
            return pb.WriteMsrOperation(
                vcpu=rng.randrange(REF_VCPUS), msr=msr, value=value, initiator=HOST
            )
        value = self.msr_value(msr, ref.maxphyaddr, valid=True)
        if roll == 1:  # an unknown initiator
            return pb.WriteMsrOperation(
                vcpu=rng.randrange(REF_VCPUS),
                msr=msr,
                value=value,
                initiator=initiator(rng.choice(BAD_ENUMS)),
            )
        return pb.WriteMsrOperation(  # an unknown vCPU
            vcpu=self.bad_vcpu(ref), msr=msr, value=value, initiator=self.initiator()
        )

    def refused_write_msrs(self) -> pb.WriteMsrsOperation:
        """Host writes the reference VM must not take: an unknown vCPU, or a first MSR KVM
        refuses (so none is written)."""
        rng, ref = self.rng, self.ref
        if self.chance(0.5):
            op = pb.WriteMsrsOperation(vcpu=self.bad_vcpu(ref))
            msr = rng.choice(MTRR_MSRS)
            op.msrs.add(msr=msr, value=self.msr_value(msr, ref.maxphyaddr, valid=True))
            return op
        op = pb.WriteMsrsOperation(vcpu=rng.randrange(REF_VCPUS))
        msr = rng.choice(MTRR_MSRS)
        op.msrs.add(msr=msr, value=self.msr_value(msr, ref.maxphyaddr, valid=False))
        for _ in range(rng.randrange(4)):
            msr = rng.choice(MTRR_MSRS)
            op.msrs.add(msr=msr, value=self.msr_value(msr, ref.maxphyaddr, valid=True))
        return op

    def refused_read_msr(self) -> pb.ReadMsrOperation:
        rng, ref = self.rng, self.ref
        roll = rng.randrange(3)
        if roll == 0:
            return pb.ReadMsrOperation(
                vcpu=rng.randrange(REF_VCPUS), msr=self.unknown_msr(), initiator=HOST
            )
        if roll == 1:
            return pb.ReadMsrOperation(
                vcpu=rng.randrange(REF_VCPUS),
                msr=self.msr(),
                initiator=initiator(rng.choice(BAD_ENUMS)),
            )
        return pb.ReadMsrOperation(vcpu=self.bad_vcpu(ref), msr=self.msr(), initiator=HOST)

    def refused_write_cr0(self) -> pb.WriteCr0Operation:
        rng, ref = self.rng, self.ref
        roll = rng.randrange(3)
        vcpu = rng.randrange(REF_VCPUS)
        if roll == 0:
            return pb.WriteCr0Operation(
                vcpu=vcpu, value=self.cr0_value(valid=False), initiator=HOST
            )
        if roll == 1:
            return pb.WriteCr0Operation(
                vcpu=vcpu,
                value=self.cr0_value(valid=True),
                initiator=initiator(rng.choice(BAD_ENUMS)),
            )
        return pb.WriteCr0Operation(
            vcpu=self.bad_vcpu(ref), value=self.cr0_value(), initiator=self.initiator()
        )

    def refused_access(self) -> pb.AccessGpaOperation:
        rng, ref = self.rng, self.ref
        if self.chance(0.5):
            return pb.AccessGpaOperation(vcpu=self.bad_vcpu(ref), gpa=self.gpa(ref))
        gpa = rng.choice(
            ((1 << 40) + rng.randrange(1 << 23), 1 << 48, U64, rng.randrange(1 << 40, 1 << 64))
        )
        return pb.AccessGpaOperation(vcpu=rng.randrange(REF_VCPUS), gpa=gpa)

    def refused_fault_range(self, vcpu: int | None = None) -> pb.FaultRangeOperation:
        rng, ref = self.rng, self.ref
        if vcpu is None and self.chance(0.2):
            start, end = self.gpa_range(ref)
            return pb.FaultRangeOperation(vcpu=self.bad_vcpu(ref), start_gpa=start, end_gpa=end)
        v = rng.randrange(REF_VCPUS) if vcpu is None else vcpu
        start = rng.randrange(1 << 20) * PAGE
        start, end = rng.choice(
            (
                (start + 1, start + GIB),
                (start, start + GIB + 0x800),
                (start, start),
                (start + GIB, start),
                (start, (1 << 40) + PAGE),
                (0, U64 - 0xFFF),
            )
        )
        return pb.FaultRangeOperation(vcpu=v, start_gpa=start, end_gpa=end)

    def refused_lane_op(self, vcpu: int) -> pb.Operation:
        """An operation on ``vcpu`` that is well formed but refused when it runs."""
        rng = self.rng
        roll = rng.randrange(4)
        if roll == 0:
            msr = rng.choice(MTRR_MSRS)
            return pb.Operation(
                write_msr=pb.WriteMsrOperation(
                    vcpu=vcpu,
                    msr=msr,
                    value=self.msr_value(msr, self.ref.maxphyaddr, valid=False),
                    initiator=HOST,
                )
            )
        if roll == 1:
            return pb.Operation(
                read_msr=pb.ReadMsrOperation(vcpu=vcpu, msr=self.unknown_msr(), initiator=HOST)
            )
        if roll == 2:
            gpa = rng.choice(((1 << 40) + rng.randrange(1 << 30), U64))
            return pb.Operation(access_gpa=pb.AccessGpaOperation(vcpu=vcpu, gpa=gpa))
        return pb.Operation(fault_range=self.refused_fault_range(vcpu))

    def refused_burst(self) -> pb.Burst:
        rng = self.rng
        burst = pb.Burst(seed=self.u64())
        vcpus = rng.sample(range(REF_VCPUS), rng.randint(1, REF_VCPUS))
        flaw = rng.randrange(7)
        for vcpu in vcpus:
            if flaw == 0:
                ops = [self.refused_lane_op(vcpu) for _ in range(rng.randint(1, 5))]
            else:
                ops = [self.plausible(self.ref, vcpu) for _ in range(rng.randint(1, 5))]
            burst.lanes.add(vcpu=vcpu, operations=ops)
        lane = burst.lanes[rng.randrange(len(burst.lanes))]
        if flaw == 1:
            burst.lanes.add().CopyFrom(lane)  # two lanes for one vCPU
        elif flaw == 2:
            burst.lanes.add(vcpu=self.bad_vcpu(self.ref), operations=[self.plausible(self.ref, 0)])
        elif flaw == 3:
            lane.operations.add(burst=pb.Burst(seed=2, lanes=[pb.Lane(vcpu=lane.vcpu)]))
        elif flaw == 4:
            lane.operations.add(attach_dma=pb.AttachDmaOperation())
        elif flaw == 5:
            lane.operations.append(self.plausible(self.ref, (lane.vcpu + 1) % REF_VCPUS))
        elif flaw == 6:
            lane.operations.add()  # no kind
        return burst

    def refused_operation(self) -> pb.Operation:
        rng = self.rng
        roll = rng.randrange(11)
        if roll == 9:  # an unknown vCPU (a refused first MSR is an outcome that wrote none)
            op = pb.WriteMsrsOperation(vcpu=self.bad_vcpu(self.ref))
            op.msrs.add(msr=msrs.PAT, value=msrs.PAT_DEFAULT)
            return pb.Operation(write_msrs=op)
        if roll == 10:
            vcpu = self.bad_vcpu(self.ref)
            if self.chance(0.5):
                return pb.Operation(read_vcpu_state=pb.ReadVcpuStateOperation(vcpu=vcpu))
            return pb.Operation(check_staleness=pb.CheckStalenessOperation(vcpu=vcpu))
        if roll == 0:
            return pb.Operation(write_msr=self.refused_write_msr())
        if roll == 1:
            return pb.Operation(read_msr=self.refused_read_msr())
        if roll == 2:
            return pb.Operation(write_cr0=self.refused_write_cr0())
        if roll == 3:
            return pb.Operation(access_gpa=self.refused_access())
        if roll == 4:
            return pb.Operation(fault_range=self.refused_fault_range())
        if roll == 5:
            vcpu = self.bad_vcpu(self.ref)
            if self.chance(0.5):
                return pb.Operation(reset_vcpu=pb.ResetVcpuOperation(vcpu=vcpu))
            return pb.Operation(init_vcpu=pb.InitVcpuOperation(vcpu=vcpu))
        if roll == 6:
            return pb.Operation()
        return pb.Operation(burst=self.refused_burst())

    # -- the RPCs ------------------------------------------------------------------------

    def vm_table(self) -> tuple[str, ...]:
        answer = self.unary("ListVms", pb.ListVmsRequest(), pb.ListVmsResponse, probe=True)
        if answer.response is None:
            return (f"ListVms answered {answer.code.name}",)
        return tuple(sorted(vm.vm_id for vm in answer.response.vms))

    def create_vm(self, request: pb.CreateVmRequest) -> Answer[pb.CreateVmResponse]:
        """CreateVm; a rejected one must leave the VM table as it was (probed sometimes)."""
        before = self.vm_table() if self.chance(SCRATCH_PROBES) else None
        answer = self.unary("CreateVm", request, pb.CreateVmResponse)
        if answer.response is not None:
            self.scratch[answer.response.vm.vm_id] = VmInfo.of(answer.response.vm)
        elif before is not None:
            after = self.vm_table()
            if after != before:
                self.report.state_changes.add(
                    kind_of("CreateVm", answer.code.name, answer.details[:60]),
                    f"{self.where()} a rejected CreateVm ({answer.code.name}) changed the VM "
                    f"table: {before} -> {after}\n    request: {short(request)}",
                )
        return answer

    def do_create_vm(self) -> None:
        request = pb.CreateVmRequest(config=self.vm_config(), strategy=self.strategy())
        if self.chance(0.05):
            key = self.rng.choice(("", "x", "level", "\u00e9", "k" * 300))
            request.strategy_options[key] = self.rng.choice(("", "1", "yes"))
        self.create_vm(request)

    def do_get_vm(self) -> None:
        self.unary(
            "GetVm", pb.GetVmRequest(vm_id=self.pick(reference=False).vm_id), pb.GetVmResponse
        )

    def do_list_vms(self) -> None:
        self.unary("ListVms", pb.ListVmsRequest(), pb.ListVmsResponse)

    def do_list_strategies(self) -> None:
        self.unary("ListStrategies", pb.ListStrategiesRequest(), pb.ListStrategiesResponse)

    def do_export_vm(self) -> None:
        vm_id = self.pick(reference=False).vm_id if self.chance(0.8) else self.unknown_id()
        answer = self.unary("ExportVm", pb.ExportVmRequest(vm_id=vm_id), pb.ExportVmResponse)
        if answer.response is not None:
            self.exports = [answer.response.data, *self.exports[:2]]

    def do_import_vm(self) -> None:
        """A snapshot exported earlier, whole or damaged (truncated, a bit flipped, random
        bytes); a refused one must leave the VM table as it was (probed sometimes)."""
        rng = self.rng
        data = rng.choice(self.exports) if self.exports else rng.randbytes(200)
        damage = rng.choice(("none", "none", "truncate", "flip", "random"))
        if damage == "truncate":
            data = data[: rng.randrange(len(data))]
        elif damage == "flip":
            position = rng.randrange(len(data))
            data = (
                data[:position]
                + bytes([data[position] ^ (1 << rng.randrange(8))])
                + data[position + 1 :]
            )
        elif damage == "random":
            data = rng.randbytes(rng.randrange(1, 300))
        before = self.vm_table() if self.chance(SCRATCH_PROBES) else None
        request = pb.ImportVmRequest(data=data)
        answer = self.unary("ImportVm", request, pb.ImportVmResponse)
        if answer.response is not None:
            self.scratch[answer.response.vm.vm_id] = VmInfo.of(answer.response.vm)
        elif before is not None and self.vm_table() != before:
            self.report.state_changes.add(
                kind_of("ImportVm", answer.code.name),
                f"{self.where()} a rejected ImportVm ({answer.code.name}, {damage}) changed "
                "the VM table",
            )

    def do_delete_vm(self) -> None:
        if self.scratch and self.chance(0.7):
            vm_id = self.rng.choice(list(self.scratch))
        else:
            vm_id = self.unknown_id()
        answer = self.unary("DeleteVm", pb.DeleteVmRequest(vm_id=vm_id), pb.DeleteVmResponse)
        if answer.ok and vm_id in self.scratch:
            del self.scratch[vm_id]
            self.gone.append(vm_id)

    def send(self, rpc: str, request: Message, response_type: type[R]) -> Callable[[], bool]:
        """A sender for :meth:`guarded`: one call, its outcome checked; True if rejected."""

        def sender() -> bool:
            answer = self.unary(rpc, request, response_type)
            outcome = getattr(answer.response, "outcome", None)
            if isinstance(outcome, pb.EventOutcome):
                self.count_fault(outcome)
            return not answer.ok

        return sender

    def do_attach_dma(self) -> None:
        vm = self.pick(reference=False)
        request = pb.AttachDmaRequest(vm_id=vm.vm_id)
        self.guarded(vm, request, self.send("AttachDma", request, pb.AttachDmaResponse))

    def do_detach_dma(self) -> None:
        vm = self.pick(reference=False)
        request = pb.DetachDmaRequest(vm_id=vm.vm_id)
        self.guarded(vm, request, self.send("DetachDma", request, pb.DetachDmaResponse))

    def do_write_msr(self) -> None:
        vm = self.pick()
        op = self.refused_write_msr() if vm is self.ref else self.write_msr_op(vm)
        request = pb.WriteMsrRequest(vm_id=vm.vm_id, operation=op)
        self.guarded(
            vm,
            request,
            self.send("WriteMsr", request, pb.WriteMsrResponse),
            vcpu=op.vcpu,
            msr=op.msr,
        )

    def do_read_msr(self) -> None:
        vm = self.pick()
        op = self.refused_read_msr() if vm is self.ref else self.read_msr_op(vm)
        request = pb.ReadMsrRequest(vm_id=vm.vm_id, operation=op)
        sender = self.send("ReadMsr", request, pb.ReadMsrResponse)
        if vm is self.ref:
            self.guarded(vm, request, sender, vcpu=op.vcpu, msr=op.msr, reads=True)
        else:
            sender()

    def do_write_cr0(self) -> None:
        vm = self.pick()
        op = self.refused_write_cr0() if vm is self.ref else self.write_cr0_op(vm)
        request = pb.WriteCr0Request(vm_id=vm.vm_id, operation=op)
        self.guarded(vm, request, self.send("WriteCr0", request, pb.WriteCr0Response), vcpu=op.vcpu)

    def do_write_msrs(self) -> None:
        vm = self.pick()
        op = self.refused_write_msrs() if vm is self.ref else self.write_msrs_op(vm)
        request = pb.WriteMsrsRequest(vm_id=vm.vm_id, operation=op)

        def sender() -> bool:
            """Rejected: refused, or stopped at its first MSR (it wrote none)."""
            answer = self.unary("WriteMsrs", request, pb.WriteMsrsResponse)
            if answer.response is None:
                return True
            outcome = answer.response.outcome
            if outcome.value > len(op.msrs) or bool(outcome.rejected) == (
                outcome.value == len(op.msrs)
            ):
                self.violation(
                    "WriteMsrs",
                    request,
                    f"wrote {outcome.value} of {len(op.msrs)}, rejected {outcome.rejected!r}",
                )
            return outcome.value == 0 and bool(op.msrs)

        first = op.msrs[0].msr if op.msrs else None
        self.guarded(vm, request, sender, vcpu=op.vcpu, msr=first)

    def do_read_vcpu_state(self) -> None:
        vm = self.pick()
        vcpu = self.bad_vcpu(vm) if vm is self.ref else self.vcpu(vm)
        op = pb.ReadVcpuStateOperation(vcpu=vcpu)
        request = pb.ReadVcpuStateRequest(vm_id=vm.vm_id, operation=op)
        sender = self.send("ReadVcpuState", request, pb.ReadVcpuStateResponse)
        if vm is self.ref:
            self.guarded(vm, request, sender, reads=True)
        else:
            sender()

    def do_reset_vcpu(self) -> None:
        vm = self.pick()
        vcpu = self.bad_vcpu(vm) if vm is self.ref else self.vcpu(vm)
        request = pb.ResetVcpuRequest(vm_id=vm.vm_id, operation=pb.ResetVcpuOperation(vcpu=vcpu))
        self.guarded(vm, request, self.send("ResetVcpu", request, pb.ResetVcpuResponse), vcpu=vcpu)

    def do_init_vcpu(self) -> None:
        vm = self.pick()
        vcpu = self.bad_vcpu(vm) if vm is self.ref else self.vcpu(vm)
        request = pb.InitVcpuRequest(vm_id=vm.vm_id, operation=pb.InitVcpuOperation(vcpu=vcpu))
        self.guarded(vm, request, self.send("InitVcpu", request, pb.InitVcpuResponse), vcpu=vcpu)

    def do_access_gpa(self) -> None:
        vm = self.pick()
        if vm is self.ref:
            op = self.refused_access()
        else:
            op = pb.AccessGpaOperation(vcpu=self.vcpu(vm), gpa=self.gpa(vm))
        request = pb.AccessGpaRequest(vm_id=vm.vm_id, operation=op)

        def sender() -> bool:
            answer = self.unary("AccessGpa", request, pb.AccessGpaResponse)
            if answer.response is not None:
                self.count_fault(answer.response.outcome)
                if vm.vm_id in self.scratch:
                    self.check_access(request, vm, op.gpa, answer.response.outcome)
            return not answer.ok

        self.guarded(vm, request, sender, vcpu=op.vcpu)

    def do_fault_range(self) -> None:
        vm = self.pick()
        op = self.refused_fault_range() if vm is self.ref else self.fault_range_op(vm)
        request = pb.FaultRangeRequest(vm_id=vm.vm_id, operation=op)
        self.guarded(vm, request, self.send("FaultRange", request, pb.FaultRangeResponse))

    def do_lookup_gpa(self) -> None:
        vm = self.pick()
        if vm is self.ref:
            gpa = self.rng.choice(((1 << 40) + self.rng.randrange(1 << 30), 1 << 52, U64))
        else:
            gpa = self.gpa(vm)
        request = pb.LookupGpaRequest(vm_id=vm.vm_id, operation=pb.LookupGpaOperation(gpa=gpa))
        sender = self.send("LookupGpa", request, pb.LookupGpaResponse)
        if vm is self.ref:
            self.guarded(vm, request, sender, reads=True)
        else:
            sender()

    def do_dump_leaves(self) -> None:
        vm = self.pick()
        rng = self.rng
        if vm is self.ref:
            runs = rng.choice((65537, 1 << 20, U32))
        else:
            runs = rng.choice((0, 0, 1, 2, 7, 4096, 65536, 65537, U32))
        request = pb.DumpLeavesRequest(vm_id=vm.vm_id, runs_per_message=runs)
        if vm is self.ref:
            sender = self.send("DumpLeaves", request, pb.DumpLeavesResponse)
            self.guarded(vm, request, sender, reads=True)
            return
        answer = self.unary("DumpLeaves", request, pb.DumpLeavesResponse)
        if answer.response is not None and vm.vm_id in self.scratch:
            self.check_leaves(request, vm, answer.response.runs)

    def do_read_counters(self) -> None:
        vm = self.pick(reference=False)
        request = pb.ReadCountersRequest(vm_id=vm.vm_id)
        self.unary("ReadCounters", request, pb.ReadCountersResponse)

    def do_check_staleness(self) -> None:
        vm = self.pick()
        if vm is self.ref:
            op = pb.CheckStalenessOperation(vcpu=self.bad_vcpu(vm))
            request = pb.CheckStalenessRequest(vm_id=vm.vm_id, operation=op)
            sender = self.send("CheckStaleness", request, pb.CheckStalenessResponse)
            self.guarded(vm, request, sender, reads=True)
            return
        op = pb.CheckStalenessOperation(vcpu=self.vcpu(vm), at_quiescence=self.chance(0.3))
        request = pb.CheckStalenessRequest(vm_id=vm.vm_id, operation=op)
        self.unary("CheckStaleness", request, pb.CheckStalenessResponse)

    # -- Execute -------------------------------------------------------------------------

    def oversized_batch(self, vm: VmInfo) -> pb.ExecuteRequest:
        """A batch of ordinary operations over the server's message limit (built as bytes)."""
        head = pb.ExecuteRequest(vm_id=vm.vm_id, batch_id=self.u64()).SerializeToString()
        entries = []
        for _ in range(64):
            body = self.plausible(
                vm, self.rng.randrange(max(1, min(vm.vcpus, 64)))
            ).SerializeToString()
            entries.append(b"\x12" + varint(len(body)) + body)
        chunk = b"".join(entries)
        copies = (LIMITS.max_message_bytes + self.rng.randint(1, 64 * KIB)) // len(chunk) + 1
        return pb.ExecuteRequest.FromString(head + chunk * copies)

    def over_the_limit(self, vm: VmInfo) -> list[pb.Operation]:
        """More operations than a batch may hold: plain, or as burst lanes."""
        rng = self.rng
        limit = LIMITS.max_batch_operations
        vcpus = max(1, min(vm.vcpus, 8))
        if self.chance(0.5):
            return [
                self.plausible(vm, rng.randrange(vcpus)) for _ in range(limit + rng.randint(1, 30))
            ]
        lanes = [
            pb.Lane(vcpu=v, operations=[self.plausible(vm, v) for _ in range(limit // vcpus + 1)])
            for v in range(vcpus)
        ]
        return [pb.Operation(burst=pb.Burst(seed=self.u64(), lanes=lanes))]

    def do_execute(self) -> None:
        vm = self.pick()
        if vm is self.ref:
            self.execute_refused()
            return
        rng = self.rng
        limit = LIMITS.max_batch_operations
        requests = []
        for index in range(rng.choice((1, 1, 1, 2, 3))):
            target = self.phantom() if index and self.chance(0.15) else vm
            roll = rng.random()
            if roll < 0.03:
                ops = self.over_the_limit(target)
            elif roll < 0.04:
                ops = [self.operation(target, burst=False) for _ in range(limit)]
            else:
                count = rng.choice((0, 1, 2, 3, 5, 10, 20, 40))
                ops = [self.operation(target) for _ in range(count)]
            requests.append(
                pb.ExecuteRequest(vm_id=target.vm_id, operations=ops, batch_id=self.u64())
            )
        known = {vm.vm_id: vm} if vm.vm_id in self.scratch else {}

        def sender() -> bool:
            answer, answered = self.execute(requests, known)
            return not answer.ok and not answered

        self.guarded(vm, requests[0], sender)

    def execute_refused(self) -> None:
        """A stream the reference VM must refuse entirely."""
        rng, ref = self.rng, self.ref
        roll = rng.random()
        if roll < 0.08:
            ops = self.over_the_limit(ref)
        else:
            ops = [self.refused_operation() for _ in range(rng.randint(1, 30))]
        requests = [pb.ExecuteRequest(vm_id=ref.vm_id, operations=ops, batch_id=self.u64())]
        if self.chance(0.2):
            more = [self.refused_operation() for _ in range(rng.randint(1, 10))]
            requests.append(pb.ExecuteRequest(vm_id=ref.vm_id, operations=more, batch_id=1))
        self.guarded(ref, requests[0], self.refused_stream(requests))

    def refused_stream(self, requests: Sequence[pb.ExecuteRequest]) -> Callable[[], bool]:
        def sender() -> bool:
            _, answered = self.execute(requests, {})
            for request, results in zip(requests, answered, strict=False):
                for result in results:
                    if accepted(result):
                        index = result.entry
                        self.violation(
                            "Execute",
                            request.operations[index],
                            f"the reference VM accepted operation {index} of batch "
                            f"{request.batch_id} (built to be refused): {short(result)}",
                        )
                        return True
            return True

        return sender

    def do_oversized(self) -> None:
        """A request over the server's message limit: gRPC's own RESOURCE_EXHAUSTED."""
        rng = self.rng
        size = LIMITS.max_message_bytes + rng.randint(1, 64 * KIB)
        roll = rng.randrange(4)
        if roll == 0:
            request = self.oversized_batch(self.ref)
            self.guarded(self.ref, request, self.refused_stream([request]))
        elif roll == 1 and self.scratch:
            vm = rng.choice(list(self.scratch.values()))
            batch = self.oversized_batch(vm)

            def sender() -> bool:
                answer, answered = self.execute([batch], {})
                return not answer.ok and not answered

            self.guarded(vm, batch, sender)
        elif roll == 2:
            slot = pb.Memslot(base_gpa=0, size_bytes=GIB, name="n" * size)
            self.create_vm(pb.CreateVmRequest(config=pb.VmConfig(memslots=[slot])))
        else:
            op = pb.WriteMsrOperation(vcpu=0, msr=msrs.DEFTYPE, value=0xC06, initiator=HOST)
            huge = pb.WriteMsrRequest(vm_id="v" * size, operation=op)
            self.unary("WriteMsr", huge, pb.WriteMsrResponse)

    # -- setup, the run, the closing scenarios -------------------------------------------

    def must(self, rpc: str, request: Message, response_type: type[R]) -> R:
        answer = self.unary(rpc, request, response_type, probe=True)
        assert answer.response is not None, (
            f"setup {rpc} failed: {answer.code.name} {answer.details}"
        )
        return answer.response

    def setup_reference(self) -> None:
        """The reference VM: MTRRs programmed, CD clear on three vCPUs, memory faulted, a range
        zapped and refaulted in part, an MMIO marker."""
        listed = self.must("ListStrategies", pb.ListStrategiesRequest(), pb.ListStrategiesResponse)
        self.strategies = [s.name for s in listed.strategies]
        created = self.must(
            "CreateVm",
            pb.CreateVmRequest(config=reference_config(), strategy="fine-grained"),
            pb.CreateVmResponse,
        )
        self.ref = ref = VmInfo.of(created.vm)

        def write(vcpu: int, msr: int, value: int, who: pb.Initiator.ValueType = HOST) -> None:
            op = pb.WriteMsrOperation(vcpu=vcpu, msr=msr, value=value, initiator=who)
            done = self.must(
                "WriteMsr", pb.WriteMsrRequest(vm_id=ref.vm_id, operation=op), pb.WriteMsrResponse
            )
            assert not done.outcome.guest_fault.reason, done

        def call(rpc: str, request: Message, response_type: type[R]) -> None:
            self.must(rpc, request, response_type)

        for vcpu in range(REF_VCPUS):
            for index, msr in enumerate(msrs.FIXED_MSRS):
                write(vcpu, msr, int.from_bytes(bytes([MTRR_TYPES[index % 5]] * 8), "little"))
            write(vcpu, msrs.PHYSBASE0, 3 * GIB)
            write(vcpu, msrs.PHYSBASE0 + 1, var_mask(GIB, ref.maxphyaddr))
            write(vcpu, msrs.PHYSBASE0 + 2, 2 * GIB | 4)
            write(vcpu, msrs.PHYSBASE0 + 3, var_mask(256 * MIB, ref.maxphyaddr))
            write(vcpu, msrs.DEFTYPE, 0xC06)
            if vcpu < REF_VCPUS - 1:
                cr0 = pb.WriteCr0Operation(vcpu=vcpu, value=ET | PE, initiator=GUEST)
                call(
                    "WriteCr0",
                    pb.WriteCr0Request(vm_id=ref.vm_id, operation=cr0),
                    pb.WriteCr0Response,
                )
        for start, end in ((0, GIB), (2 * GIB, 2 * GIB + 256 * MIB), (4 * GIB, 4 * GIB + 64 * MIB)):
            fault = pb.FaultRangeOperation(vcpu=0, start_gpa=start, end_gpa=end)
            call(
                "FaultRange",
                pb.FaultRangeRequest(vm_id=ref.vm_id, operation=fault),
                pb.FaultRangeResponse,
            )
        for gpa in (REF_MMIO_GPA, REF_BAR_BASE + 2 * MIB - PAGE):
            touch = pb.AccessGpaOperation(vcpu=1, gpa=gpa)
            call(
                "AccessGpa",
                pb.AccessGpaRequest(vm_id=ref.vm_id, operation=touch),
                pb.AccessGpaResponse,
            )
        write(0, msrs.PHYSBASE0 + 2, 2 * GIB | 6, GUEST)  # a zap of [2 GiB, 2 GiB + 256 MiB)
        refault = pb.AccessGpaOperation(vcpu=0, gpa=2 * GIB)
        call(
            "AccessGpa",
            pb.AccessGpaRequest(vm_id=ref.vm_id, operation=refault),
            pb.AccessGpaResponse,
        )
        self.ref_state = self.reference_snapshot()
        self.report.reference_before = dict(self.ref_state)

    def actions(self) -> list[tuple[Callable[[], None], float]]:
        return [
            (self.do_create_vm, 5),
            (self.do_get_vm, 3),
            (self.do_list_vms, 1),
            (self.do_delete_vm, 2.5),
            (self.do_attach_dma, 2.5),
            (self.do_detach_dma, 2.5),
            (self.do_write_msr, 14),
            (self.do_read_msr, 7),
            (self.do_write_cr0, 8),
            (self.do_write_msrs, 4),
            (self.do_read_vcpu_state, 3),
            (self.do_reset_vcpu, 3),
            (self.do_init_vcpu, 3),
            (self.do_access_gpa, 10),
            (self.do_fault_range, 6),
            (self.do_lookup_gpa, 5),
            (self.do_dump_leaves, 3),
            (self.do_export_vm, 1),
            (self.do_import_vm, 1.5),
            (self.do_read_counters, 3),
            (self.do_check_staleness, 3),
            (self.do_list_strategies, 1),
            (self.do_execute, 7),
            (self.do_oversized, 0.3),
        ]

    def run(self) -> None:
        started = time.perf_counter()
        self.setup_reference()
        actions = self.actions()
        functions = [function for function, _ in actions]
        weights = [weight for _, weight in actions]
        while self.report.total < MIN_REQUESTS:
            self.rng.choices(functions, weights)[0]()
        self.request_no += 1
        self.report.reference_after = self.reference_snapshot()
        self.oversized_create_answer()
        self.oversized_execute_answer()
        self.dma_devices_exhausted()
        self.report.seconds = time.perf_counter() - started

    def capacity(self) -> int:
        """How many more one-page VMs the server takes now (they are deleted again)."""
        created = []
        slot = pb.Memslot(base_gpa=0, size_bytes=PAGE)
        for _ in range(LIMITS.max_vms + 1):
            request = pb.CreateVmRequest(config=pb.VmConfig(memslots=[slot]))
            answer = self.unary("CreateVm", request, pb.CreateVmResponse, probe=True)
            if answer.response is None:
                break
            created.append(answer.response.vm.vm_id)
        for vm_id in created:
            self.must("DeleteVm", pb.DeleteVmRequest(vm_id=vm_id), pb.DeleteVmResponse)
        return len(created)

    def oversized_create_answer(self) -> None:
        """A CreateVm that fits the message limit, whose answer (the effective configuration,
        every memslot's kind spelt out) does not."""
        self.request_no += 1
        for vm_id in list(self.scratch):
            self.must("DeleteVm", pb.DeleteVmRequest(vm_id=vm_id), pb.DeleteVmResponse)
            del self.scratch[vm_id]
        count = LIMITS.max_message_bytes // 12
        while True:
            slots = [pb.Memslot(base_gpa=k * 2 * PAGE, size_bytes=PAGE) for k in range(count)]
            request = pb.CreateVmRequest(config=pb.VmConfig(memslots=slots))
            if request.ByteSize() < LIMITS.max_message_bytes - 4 * KIB:
                break
            count -= count // 50
        free = self.capacity()
        answer = self.unary("CreateVm", request, pb.CreateVmResponse)
        if answer.response is not None:
            self.must(
                "DeleteVm", pb.DeleteVmRequest(vm_id=answer.response.vm.vm_id), pb.DeleteVmResponse
            )
            return
        after = self.capacity()
        if after != free:
            listed = self.unary("ListVms", pb.ListVmsRequest(), pb.ListVmsResponse, probe=True)
            self.report.state_changes.add(
                "CreateVm with an answer over the message limit",
                f"{self.where()} CreateVm answered {answer.code.name} ({answer.details}) yet "
                f"created the VM: {free} more VMs fitted before, {after} after, and ListVms "
                f"now answers {listed.code.name} {listed.details[:120]}"
                f"\n    request: CreateVmRequest with {count} memslots "
                f"{{base_gpa: 8 KiB * k, size_bytes: 4096}}, k = 0..{count - 1} "
                f"({request.ByteSize()} bytes; limit {LIMITS.max_message_bytes})",
            )

    def dma_devices_exhausted(self) -> None:
        """An attach past the most DMA devices a VM holds, inside a batch: RESOURCE_EXHAUSTED
        for that operation only; the detach after it still runs."""
        self.request_no += 1
        config = pb.VmConfig(noncoherent_dma=MAX_DMA)
        created = self.must("CreateVm", pb.CreateVmRequest(config=config), pb.CreateVmResponse)
        vm = VmInfo.of(created.vm)
        ops = [
            pb.Operation(attach_dma=pb.AttachDmaOperation()),
            pb.Operation(detach_dma=pb.DetachDmaOperation()),
        ]
        request = pb.ExecuteRequest(vm_id=vm.vm_id, operations=ops)
        _, answered = self.execute([request], {vm.vm_id: vm})
        statuses = [r.error.status or "OK" for results in answered for r in results]
        if statuses != ["RESOURCE_EXHAUSTED", "OK"]:
            self.violation("Execute", request, f"attach past the limit answered {statuses}")
        self.must("DeleteVm", pb.DeleteVmRequest(vm_id=vm.vm_id), pb.DeleteVmResponse)

    def oversized_execute_answer(self) -> None:
        """An Execute batch within both limits with a large answer: 30 bursts of 64 lanes, each
        lane one guest defType write, on a VM whose zaps are split over 64 memslots (every
        lane's result lists queued ranges). Every result must arrive."""
        self.request_no += 1
        vcpus = 64
        slots = [pb.Memslot(base_gpa=0, size_bytes=GIB)] + [
            pb.Memslot(base_gpa=2 * GIB + k * 2 * MIB, size_bytes=PAGE, kind=pb.MEMSLOT_KIND_DEVICE)
            for k in range(63)
        ]
        config = pb.VmConfig(vcpus=vcpus, noncoherent_dma=1, memslots=slots)
        created = self.must(
            "CreateVm",
            pb.CreateVmRequest(config=config, strategy="fine-grained-split"),
            pb.CreateVmResponse,
        )
        vm = VmInfo.of(created.vm)
        self.scratch[vm.vm_id] = vm
        clear_cd = [
            pb.Operation(write_cr0=pb.WriteCr0Operation(vcpu=v, value=ET | PE, initiator=HOST))
            for v in range(vcpus)
        ]
        setup = pb.ExecuteRequest(vm_id=vm.vm_id, operations=clear_cd)
        _, answered = self.execute([setup], {})
        assert len(answered) == 1 and not any(r.HasField("error") for r in answered[0])
        bursts = [
            pb.Operation(
                burst=pb.Burst(
                    seed=k,
                    lanes=[
                        pb.Lane(
                            vcpu=v,
                            operations=[
                                pb.Operation(
                                    write_msr=pb.WriteMsrOperation(
                                        vcpu=v,
                                        msr=msrs.DEFTYPE,
                                        value=0xC00 | (6 if k % 2 == 0 else 0),
                                        initiator=GUEST,
                                    )
                                )
                            ],
                        )
                        for v in range(vcpus)
                    ],
                )
            )
            for k in range(30)
        ]
        request = pb.ExecuteRequest(vm_id=vm.vm_id, operations=bursts, batch_id=7)

        def sender() -> bool:
            answer, answered = self.execute([request], {})
            return not answer.ok and not answered

        self.guarded(vm, request, sender, vcpu=0, msr=msrs.DEFTYPE, always=True)
        self.must("DeleteVm", pb.DeleteVmRequest(vm_id=vm.vm_id), pb.DeleteVmResponse)
        del self.scratch[vm.vm_id]


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def accepted(result: pb.OperationResult) -> bool:
    """Whether a batch result took effect."""
    return result.HasField("outcome")


# -- the run and its checks -----------------------------------------------------------------


@dataclass
class Run:
    report: Report
    channel: grpc.Channel
    stub: pb_grpc.EmulatorServiceStub
    reference: str


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with serving(limits=LIMITS, max_workers=16, streams=StreamLimits(max_streams=8)) as server:
        channel = grpc.insecure_channel(
            server.addresses[0],
            options=[
                ("grpc.max_send_message_length", CLIENT_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", CLIENT_MESSAGE_BYTES),
            ],
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
            stub = pb_grpc.EmulatorServiceStub(channel)
            campaign = Campaign(stub, random.Random(SEED))
            campaign.run()
            print(campaign.report.summary())
            yield Run(campaign.report, channel, stub, campaign.ref.vm_id)
        finally:
            channel.close()


def test_every_answer_is_ok_a_guest_fault_or_a_documented_status(run: Run) -> None:
    if run.report.violations:
        pytest.fail(listing(run.report.violations.lines(), run.report), pytrace=False)


def test_the_fuzz_reached_every_rpc_and_every_documented_status(run: Run) -> None:
    report = run.report
    assert report.total >= MIN_REQUESTS, report.summary()
    per_rpc, per_code = report.per_rpc(), report.per_code()
    assert not set(RPCS) - set(per_rpc), f"never called: {set(RPCS) - set(per_rpc)}"
    for code in ("OK", *(code.name for code in DOCUMENTED_ERRORS)):
        assert per_code[code] > 0, f"{code} never answered\n{report.summary()}"
    never_refused = {"ListVms", "ListStrategies"}
    for rpc in RPCS:
        assert report.answers[rpc, "OK"] > 0, f"{rpc} never answered OK\n{report.summary()}"
        refused = per_rpc[rpc] - report.answers[rpc, "OK"]
        assert refused > 0 or rpc in never_refused, f"{rpc} never refused\n{report.summary()}"
    assert report.guest_faults > 0, report.summary()
    operations = report.operations
    assert operations["outcome"] and operations["burst"], report.summary()
    for code in OPERATION_ERRORS:
        assert operations[f"error {code}"] > 0, f"no operation refused with {code}"


def test_the_reference_vm_is_unchanged(run: Run) -> None:
    before, after = run.report.reference_before, run.report.reference_after
    assert before and after.keys() == before.keys()
    changed = [key for key in before if before[key] != after[key]]
    if changed:
        lines = [f"{key}: {difference(before[key], after[key])}" for key in changed]
        pytest.fail(listing(lines, run.report), pytrace=False)


def test_rejected_requests_change_no_state(run: Run) -> None:
    if run.report.state_changes:
        pytest.fail(listing(run.report.state_changes.lines(), run.report), pytrace=False)


def test_answers_make_sense(run: Run) -> None:
    if run.report.wrong_answers:
        pytest.fail(listing(run.report.wrong_answers.lines(), run.report), pytrace=False)


def test_the_server_is_healthy_afterwards(run: Run) -> None:
    health = health_pb2_grpc.HealthStub(run.channel)
    for service in ("", SERVICE_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    stub = run.stub
    assert stub.GetVm(pb.GetVmRequest(vm_id=run.reference), timeout=CALL_TIMEOUT).vm.vm_id
    vm = stub.CreateVm(pb.CreateVmRequest(config=pb.VmConfig(vcpus=2)), timeout=CALL_TIMEOUT).vm
    op = pb.WriteMsrOperation(vcpu=1, msr=msrs.DEFTYPE, value=0xC06, initiator=GUEST)
    wrote = stub.WriteMsr(pb.WriteMsrRequest(vm_id=vm.vm_id, operation=op), timeout=CALL_TIMEOUT)
    assert not wrote.outcome.guest_fault.reason
    access = pb.AccessGpaOperation(vcpu=0, gpa=GIB + PAGE)
    touched = stub.AccessGpa(
        pb.AccessGpaRequest(vm_id=vm.vm_id, operation=access), timeout=CALL_TIMEOUT
    )
    assert touched.outcome.access.kind == pb.ACCESS_KIND_FAULT
    counters = stub.ReadCounters(pb.ReadCountersRequest(vm_id=vm.vm_id), timeout=CALL_TIMEOUT)
    assert counters.outcome.vm_counters.faults == 1
    stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm.vm_id), timeout=CALL_TIMEOUT)


# -- raw bytes to every RPC -----------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["EmulatorService"]
#: The codes an RPC may answer a request with: OK, or a documented refusal.
ANSWERS = {Code.OK, *DOCUMENTED_ERRORS}
#: A line of the server's log stays under this many characters.
LINE_BOUND = 300


def reachable(roots: Sequence[Descriptor]) -> list[Descriptor]:
    """``roots`` and every message type their fields lead to."""
    seen: dict[str, Descriptor] = {}
    stack = list(roots)
    while stack:
        message = stack.pop()
        if message.full_name not in seen:
            seen[message.full_name] = message
            stack += [f.message_type for f in message.fields if f.message_type is not None]
    return list(seen.values())


MESSAGES = reachable([method.input_type for method in SERVICE.methods])
#: Field numbers of the requests and what they hold, for bytes that reach real fields.
NUMBERS = sorted({field.number for message in MESSAGES for field in message.fields})
STRING_NUMBERS = sorted(
    {f.number for m in MESSAGES for f in m.fields if f.type == FieldDescriptor.TYPE_STRING}
)
MESSAGE_NUMBERS = sorted(
    {f.number for m in MESSAGES for f in m.fields if f.message_type is not None}
)
BAD_UTF8 = (b"\xff", b"\xc3", b"\xc3\x28", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80")


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, body: bytes) -> bytes:
    return tag(number, 2) + varint(len(body)) + body


numbers = st.one_of(st.sampled_from(NUMBERS), st.integers(1, (1 << 29) - 1))


@st.composite
def well_formed(draw: st.DrawFn) -> bytes:
    """One field that is valid wire format (whether the request has it or not)."""
    number, wire_type = draw(numbers), draw(st.sampled_from((0, 1, 2, 5)))
    if wire_type == 0:
        return tag(number, 0) + varint(draw(st.integers(0, U64)))
    if wire_type == 2:
        return delimited(number, draw(st.text(max_size=12)).encode())
    return tag(number, wire_type) + draw(st.binary(min_size=4 << (wire_type == 1), max_size=8))


@st.composite
def flaw(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Bytes that break the wire format (or random bytes), and whether they must end their
    message to do so."""
    number = draw(numbers)
    kind = draw(st.sampled_from(("varint", "long varint", "wire type", "length", "utf-8", "any")))
    if kind == "varint":  # truncated: the last byte says more follow
        return tag(number, 0) + b"\x80" * draw(st.integers(1, 9)), True
    if kind == "long varint":  # eleven bytes
        return tag(number, 0) + b"\xff" * 10 + b"\x01", False
    if kind == "wire type":  # 6 and 7 do not exist; a group that never ends or never began
        wire_type = draw(st.sampled_from((3, 4, 6, 7)))
        return tag(number, wire_type) + draw(st.binary(max_size=8)), wire_type == 3
    if kind == "length":  # a length prefix longer than what follows
        body = draw(st.binary(max_size=16))
        extra = draw(st.one_of(st.integers(1, 8), st.integers(9, (1 << 32) - 1)))
        return tag(number, 2) + varint(len(body) + extra) + body, True
    if kind == "utf-8":
        text = draw(st.text(max_size=8)).encode()
        body = text + draw(st.sampled_from(BAD_UTF8)) + text
        return delimited(draw(st.sampled_from(STRING_NUMBERS)), body), False
    return draw(st.binary(min_size=1, max_size=48)), True


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Valid fields around one flaw, the flaw perhaps nested inside message fields."""
    broken, at_end = draw(flaw())
    for number in draw(st.lists(st.sampled_from(MESSAGE_NUMBERS), max_size=2)):
        broken, at_end = delimited(number, broken), False
    before = draw(st.lists(well_formed(), max_size=3))
    after = [] if at_end else draw(st.lists(well_formed(), max_size=2))
    return b"".join([*before, broken, *after])


def decodes(message: Descriptor, data: bytes) -> bool:
    try:
        GetMessageClass(message).FromString(data)
    except DecodeError:
        return False
    return True


def judge(method: str, request: Descriptor, data: bytes, answer: RawAnswer) -> str | None:
    """What is wrong with ``answer`` to ``data`` sent to ``method``, if anything."""
    said = f"{method}({data.hex()}) answered {answer.code.name}: {answer.details!r}"
    reason = answer.trailers.get("mtrremu-reason")
    if not decodes(request, data):
        refusal = f"the request is not a valid {request.full_name}: "
        if answer.code is not Code.INVALID_ARGUMENT or not answer.details.startswith(refusal):
            return f"{said}; expected INVALID_ARGUMENT, {refusal}..."
        if reason != "INVALID_ARGUMENT":
            return f"{said} with mtrremu-reason {reason!r}"
    elif answer.code not in ANSWERS:
        return f"{said}; the bytes decode: expected OK or a documented status"
    elif answer.code is not Code.OK and not reason:
        return f"{said} without an mtrremu reason"
    return None


def test_raw_bytes_to_every_rpc_are_refused_unless_they_decode() -> None:
    tally: Counter[str] = Counter()
    with (
        serving(limits=LIMITS, max_workers=16, streams=StreamLimits(max_streams=8)) as server,
        grpc.insecure_channel(server.addresses[0]) as channel,
        server_log() as records,
    ):

        @given(data=raw_requests())
        @example(data=b"")  # decodes as every request
        @example(data=b"\x08")
        @example(data=b"\x0a\x05ab")
        @example(data=b"\x0a\x01\xff")
        @example(data=b"\x0f\x00")
        @example(data=b"\xff" * 11)
        @example(data=b'{"vmId": "vm-1"}')
        def every_rpc(data: bytes) -> None:
            logged = len(records)
            for method in SERVICE.methods:
                answer = call_raw(channel, method, [data], timeout=CALL_TIMEOUT)
                wrong = judge(method.name, method.input_type, data, answer)
                assert wrong is None, wrong
                tally["decoded" if decodes(method.input_type, data) else "refused"] += 1
            lines = [r.getMessage() for r in records[logged:]]
            assert not [r for r in records[logged:] if r.exc_info], lines
            assert all(len(line) < LINE_BOUND and "Traceback" not in line for line in lines)
            calls = sorted(f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods)
            assert sorted(line.split()[0] for line in lines) == calls, lines  # one line a call

        every_rpc()
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING, service
        stub = pb_grpc.EmulatorServiceStub(channel)
        assert stub.ListStrategies(pb.ListStrategiesRequest(), timeout=CALL_TIMEOUT).strategies
        stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT)
    assert tally["refused"] >= len(SERVICE.methods) and tally["decoded"] >= len(SERVICE.methods)
