"""Interop: the Node.js client (``clients/node/scenario.mjs``) and the Python client play the same
VMM scenario against a real server, over TCP and over a unix socket, and must see the same thing.

The scenario (QEMU's reset push as one multi-MSR write, SeaBIOS's MTRR programming, accesses, a
bulk fault, a CD toggle, a guest #GP, a refused host write, a multi-MSR write that stops part way,
reads of a vCPU's registers, a lookup and the oracle, and an Execute batch with reads and an
error result inside it) is written twice, once per language: ``SCENARIO`` in the
Node script and :func:`scenario` here. The step names are the comparison key, so a step missing
or out of order on either side fails the test.

Needs ``node`` on PATH and ``npm ci --prefix clients/node``; skipped without them unless
``MTRREMU_REQUIRE_NODE=1`` (CI), which turns a missing toolchain into a failure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mtrremu.client import Client, RemoteVm
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.errors import MtrremuError
from mtrremu.core.events import CheckStaleness, LookupGpa, Op, ReadVcpuState
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import GIB, KIB, MIB, ROOT, require_node_toolchain, run_command, serving

NODE_CLIENT = ROOT / "clients" / "node"
SCENARIO_SCRIPT = NODE_CLIENT / "scenario.mjs"

Json = dict[str, Any]


# -- the scenario (mirrors SCENARIO in clients/node/scenario.mjs) --------------------------------

DEFTYPE = 0x2FF
FIXED_MSRS = (0x250, 0x258, 0x259, *range(0x268, 0x270))
VARIABLE_MSRS = tuple(range(0x200, 0x210))
CR0_CD_CLEARED = 0x11  # RESET's 0x60000010 with CD and NW cleared, plus PE
CR0_CD = 1 << 30

CONFIG = VmConfig(
    vcpus=2,
    noncoherent_dma=1,
    memslots=(
        Memslot.from_bytes(0, 640 * KIB, name="low"),
        Memslot.from_bytes(MIB, 2 * GIB - MIB, name="below-4g"),
        Memslot.from_bytes(4 * GIB, 2 * GIB, name="above-4g"),
    ),
)
STRATEGY = "fine-grained"


@dataclass(frozen=True)
class Step:
    """One RPC on the VM; ``expect`` is ``"gp"`` or the status code name the call must fail with."""

    name: str
    call: Callable[[RemoteVm], pb.EventOutcome | list[pb.OperationResult]]
    expect: str | None = None


def wrmsr(phase: str, vcpu: int, msr: int, value: int, *, host: bool = False) -> Step:
    who = "host" if host else "guest"
    return Step(
        f"{phase}: vcpu{vcpu} {who} wrmsr {msr:#x}={value:#x}",
        lambda vm: vm.write_msr(vcpu, msr, value, host=host),
    )


def cr0(phase: str, vcpu: int, value: int) -> Step:
    return Step(f"{phase}: vcpu{vcpu} guest cr0={value:#x}", lambda vm: vm.write_cr0(vcpu, value))


def access(phase: str, vcpu: int, gpa: int) -> Step:
    return Step(f"{phase}: vcpu{vcpu} access {gpa:#x}", lambda vm: vm.access(vcpu, gpa))


def wrmsrs(phase: str, vcpu: int, pairs: list[tuple[int, int]]) -> Step:
    return Step(
        f"{phase}: vcpu{vcpu} host wrmsrs {len(pairs)} msrs",
        lambda vm: vm.write_msrs(vcpu, pairs),
    )


def read(name: str, op: Op) -> Step:
    return Step(name, lambda vm: vm.apply(op))


def batch(phase: str, operations: list[pb.Operation]) -> Step:
    return Step(
        f"{phase}: batch of {len(operations)}", lambda vm: list(vm.execute_messages(operations))
    )


def fault_range(phase: str, vcpu: int, start: int, end: int) -> Step:
    return Step(
        f"{phase}: vcpu{vcpu} fault-range [{start:#x}, {end:#x})",
        lambda vm: vm.fault_range(vcpu, start, end),
    )


def reset_push(vcpu: int) -> Step:
    """QEMU's reset push: one KVM_SET_MSRS of zeros, defType first, then fixed, then variable."""
    msrs = (DEFTYPE, *FIXED_MSRS, *VARIABLE_MSRS)
    return wrmsrs("qemu-reset-push", vcpu, [(msr, 0) for msr in msrs])


def seabios_mtrr_setup(vcpu: int) -> list[Step]:
    """SeaBIOS ``mtrr_setup`` on the BSP, after ``transition32`` cleared CD/NW."""
    phase = "seabios-mtrr-setup"
    return [
        wrmsr(phase, vcpu, DEFTYPE, 0),
        wrmsr(phase, vcpu, 0x250, 0x0606060606060606),
        wrmsr(phase, vcpu, 0x258, 0x0606060606060606),
        wrmsr(phase, vcpu, 0x259, 0),
        *(wrmsr(phase, vcpu, msr, 0x0505050505050505) for msr in range(0x268, 0x270)),
        *(wrmsr(phase, vcpu, msr, 0) for msr in VARIABLE_MSRS),
        wrmsr(phase, vcpu, 0x200, 0xC0000000),  # PhysBase0: 3 GiB, UC
        wrmsr(phase, vcpu, 0x201, 0xFF_C000_0800),  # PhysMask0: 1 GiB at MAXPHYADDR 40, V
        wrmsr(phase, vcpu, DEFTYPE, 0xC06),  # E + FE, default WB
    ]


def scenario() -> list[Step]:
    bad_guest = wrmsr("bad-guest-write", 0, 0x202, 0x8000_0002)  # type 2 is reserved
    bad_host = wrmsr("bad-host-write", 0, DEFTYPE, 0x300, host=True)  # reserved bits 8-9
    return [
        reset_push(0),
        reset_push(1),
        cr0("seabios-transition32", 0, CR0_CD_CLEARED),
        *seabios_mtrr_setup(0),
        cr0("seabios-entry-smp", 1, CR0_CD_CLEARED),
        access("accesses", 0, 0x0),
        access("accesses", 0, 0x9F000),
        access("accesses", 0, 0x100000),
        access("accesses", 0, 0xC0000000),  # the PCI hole, outside every memslot: MMIO exit
        access("accesses", 0, 0x1_0000_0000),
        fault_range("fault-range", 1, 0x100000, 0x40000000),
        cr0("cd-toggle", 0, CR0_CD_CLEARED | CR0_CD),
        cr0("cd-toggle", 0, CR0_CD_CLEARED),
        replace(bad_guest, expect="gp"),
        replace(bad_host, expect="INVALID_ARGUMENT"),
        # Stops at its second MSR (reserved bits 8-9): value 1, rejected says why.
        wrmsrs("partial-set-msrs", 1, [(0x277, 0x0007040600070406), (DEFTYPE, 0x300), (0x200, 0)]),
        read("snapshot: vcpu0 state", ReadVcpuState(0)),
        read("snapshot: lookup 0x100000000", LookupGpa(0x1_0000_0000)),
        read("snapshot: vcpu0 staleness", CheckStaleness(0)),
        batch(
            "batch",
            [
                pb.Operation(access_gpa=pb.AccessGpaOperation(vcpu=1, gpa=0x4000_0000)),
                pb.Operation(read_vcpu_state=pb.ReadVcpuStateOperation(vcpu=1)),
                pb.Operation(
                    write_cr0=pb.WriteCr0Operation(vcpu=7, value=0, initiator=pb.INITIATOR_GUEST)
                ),
                pb.Operation(lookup_gpa=pb.LookupGpaOperation(gpa=0x4000_0000)),
                pb.Operation(read_counters=pb.ReadCountersOperation()),
            ],
        ),
    ]


#: Zap events the rules predict (fine-grained, i.e. Base2): the reset pushes run at CD=1 (no
#: events); vCPU 0 clears CD (1); its defType <- 0 at CD=0 zaps all (2); the fixed and variable
#: writes that follow have E=0 (no events); defType <- 0xC06 (3); vCPU 1 clears CD (4); vCPU 0's
#: CD toggle, 0 -> 1 -> 0 (5, 6); the #GP changes nothing and the refused host write never ran.
EXPECTED_ZAP_EVENTS = 6


def error_reason(error: grpc.RpcError) -> str | None:
    """The reason of the google.rpc.ErrorInfo in a failed call's status details, if any."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    for detail in [] if status is None else status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return None


def run_python(target: str) -> Json:
    """The scenario through :class:`mtrremu.client.Client`, in the Node script's JSON shape."""
    steps: list[Json] = []
    with Client(target) as client:
        client.wait_ready()
        vm = client.create_vm(CONFIG, STRATEGY)
        try:
            for step in scenario():
                try:
                    outcome = step.call(vm)
                except MtrremuError as error:
                    cause = error.__cause__
                    assert step.expect not in (None, "gp"), f"{step.name}: {error}"
                    assert isinstance(cause, grpc.RpcError) and isinstance(cause, grpc.Call)
                    failure: Json = {"code": cause.code().name}
                    reason = error_reason(cause)
                    if reason is not None:
                        failure["reason"] = reason
                    steps.append({"name": step.name, "error": failure})
                    continue
                assert step.expect in (None, "gp"), f"{step.name}: expected {step.expect}"
                if isinstance(outcome, list):
                    steps.append({"name": step.name, "results": [to_dict(r) for r in outcome]})
                    continue
                if step.expect == "gp":
                    assert outcome.guest_fault.reason, step.name
                steps.append({"name": step.name, "outcome": to_dict(outcome)})
            request = pb.ReadCountersRequest(vm_id=vm.vm_id)
            counters = client.stub.ReadCounters(request, timeout=client.timeout).outcome.vm_counters
        finally:
            vm.delete()
    return {"steps": steps, "counters": to_dict(counters)}


def to_dict(message: pb.EventOutcome | pb.OperationResult | pb.Counters) -> Json:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def run_node(node: str, target: str) -> Json:
    done = run_command(node, str(SCENARIO_SCRIPT), target, timeout=120)
    assert done.returncode == 0, f"scenario.mjs exited {done.returncode}:\n{done.stderr}"
    document: Json = json.loads(done.stdout)
    return document


def normalise_node(value: Any, descriptor: Descriptor) -> Any:
    """The ONE representational fix-up between the two decoders.

    With ``oneofs: true`` proto-loader adds, for every set oneof, a virtual property (named
    after the oneof) whose value names the member that is set. A proto3 ``optional`` field is a
    synthetic oneof ``_<field>`` (the only oneofs in EventOutcome and Counters), so a set
    ``EventOutcome.value`` arrives as ``{"value": "17", "_value": "value"}``; ``MessageToDict``
    has no such marker. This drops exactly those markers, and only where the message's
    descriptor declares that oneof and the marker names a member present beside it; every other
    key is kept, and a key the descriptor does not know fails loudly (KeyError).
    """
    if not isinstance(value, dict):
        return value
    result: Json = {}
    for key, item in value.items():
        oneof = descriptor.oneofs_by_name.get(key)
        if (
            oneof is not None
            and isinstance(item, str)
            and item in {member.name for member in oneof.fields}
            and item in value
        ):
            continue
        field = descriptor.fields_by_name[key]
        sub = field.message_type
        if sub is None or sub.GetOptions().map_entry:  # the API's maps hold scalars
            result[key] = item
        elif isinstance(item, list):
            result[key] = [normalise_node(entry, sub) for entry in item]
        else:
            result[key] = normalise_node(item, sub)
    return result


def normalise_node_document(document: Json) -> Json:
    steps = [
        {**step, "outcome": normalise_node(step["outcome"], pb.EventOutcome.DESCRIPTOR)}
        if "outcome" in step
        else {
            **step,
            "results": [normalise_node(r, pb.OperationResult.DESCRIPTOR) for r in step["results"]],
        }
        if "results" in step
        else step
        for step in document["steps"]
    ]
    counters = normalise_node(document["counters"], pb.Counters.DESCRIPTOR)
    return {"steps": steps, "counters": counters}


@pytest.fixture(params=["tcp", "unix"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A real server, in-process, on 127.0.0.1:0 or on a unix socket in ``tmp_path``."""
    listen = "127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path / 'mtrremu.sock'}"
    with serving(listen) as server:
        (address,) = server.addresses
        yield address


def test_node_and_python_clients_agree(target: str) -> None:
    node = require_node_toolchain(NODE_CLIENT / "node_modules")
    from_node = normalise_node_document(run_node(node, target))
    from_python = run_python(target)

    names = [step.name for step in scenario()]
    assert len(set(names)) == len(names) == 50
    assert [s["name"] for s in from_node["steps"]] == names
    assert [s["name"] for s in from_python["steps"]] == names
    for node_step, python_step in zip(from_node["steps"], from_python["steps"], strict=True):
        assert node_step == python_step, node_step["name"]
    assert from_node["counters"] == from_python["counters"]

    # Concrete facts, so that two equally empty documents cannot pass.
    steps = {s["name"]: s for s in from_python["steps"]}
    gp = steps["bad-guest-write: vcpu0 guest wrmsr 0x202=0x80000002"]["outcome"]
    assert "MTRRphysBase1" in gp["guest_fault"]["reason"]
    assert gp["counters"] == {"guest_gp": "1"}
    mmio = steps["accesses: vcpu0 access 0xc0000000"]["outcome"]
    assert mmio["access"]["kind"] == "ACCESS_KIND_MMIO_EXIT"
    assert steps["bad-host-write: vcpu0 host wrmsr 0x2ff=0x300"]["error"] == {
        "code": "INVALID_ARGUMENT",
        "reason": "HOST_WRITE_REJECTED",
    }
    cd_on = steps["cd-toggle: vcpu0 guest cr0=0x40000011"]["outcome"]
    assert cd_on["cd_toggled"] is True
    assert cd_on["value"] == str(0x40000011)
    above_4g = steps["accesses: vcpu0 access 0x100000000"]["outcome"]["access"]
    assert above_4g["mapping"] == {
        "base_gpa": str(4 * GIB),
        "level": "LEVEL_1G",
        "memory_type": "MEMORY_TYPE_WB",
    }
    zap_events = sum(
        int(s.get("outcome", {}).get("counters", {}).get("zap_events", "0"))
        for s in from_python["steps"]
    )
    assert zap_events == EXPECTED_ZAP_EVENTS
    assert from_python["counters"]["zap_events"] == str(EXPECTED_ZAP_EVENTS)
    assert from_python["counters"]["mmio_exits"] == "1"
    assert from_python["counters"]["guest_gp"] == "1"
    partial = steps["partial-set-msrs: vcpu1 host wrmsrs 3 msrs"]["outcome"]
    assert partial["value"] == "1" and "MTRRdefType" in partial["rejected"]
    state = steps["snapshot: vcpu0 state"]["outcome"]["vcpu_state"]
    assert state["cr0"] == str(CR0_CD_CLEARED) and len(state["mtrrs"]) == 28
    assert {"msr": DEFTYPE, "value": str(0xC06)} in state["mtrrs"]
    looked = steps["snapshot: lookup 0x100000000"]["outcome"]["lookup"]
    assert looked["mapping"] == above_4g["mapping"]
    results = steps["batch: batch of 5"]["results"]
    assert [r.get("entry", 0) for r in results] == [0, 1, 2, 3, 4]
    assert results[2]["error"]["reason"] == "VCPU_NOT_FOUND"
    assert results[2]["error"]["metadata"] == {"vcpu": "7", "vcpus": "2"}
    assert results[3]["outcome"]["lookup"]["mapping"]["base_gpa"] == str(GIB)
