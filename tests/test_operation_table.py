"""The operation table (mtrremu.core.operations) is the one description of the operations:
the proto, the in-process VM, the client and the trace format must all follow it."""

from __future__ import annotations

import dataclasses

import pytest

from mtrremu.core.operations import BY_NAME, OPERATIONS, OperationKind
from mtrremu.core.vm import Vm
from mtrremu.server.servicer import Servicer
from mtrremu.v1 import emulator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EmulatorService"]
#: Dataclass field -> protobuf field, where the two differ.
WIRE_NAMES = {"host": "initiator"}


def test_the_operation_oneof_lists_exactly_the_table_and_bursts() -> None:
    oneof = pb.Operation.DESCRIPTOR.oneofs_by_name["kind"]
    assert {f.name for f in oneof.fields} == {*BY_NAME, "burst"}


@pytest.mark.parametrize("kind", OPERATIONS, ids=lambda k: k.name)
def test_each_operation_has_its_message_rpc_and_fields(kind: OperationKind) -> None:
    field = pb.Operation.DESCRIPTOR.fields_by_name[kind.name]
    assert field.message_type is not None
    assert field.message_type.name == f"{kind.rpc}Operation"
    wire = [WIRE_NAMES.get(f.name, f.name) for f in dataclasses.fields(kind.type)]
    assert [f.name for f in field.message_type.fields] == wire
    method = SERVICE.methods_by_name[kind.rpc]
    assert method.input_type.name == f"{kind.rpc}Request"
    assert method.output_type.name == f"{kind.rpc}Response"
    assert [f.name for f in method.input_type.fields] == ["vm_id", "operation"]
    assert method.input_type.fields_by_name["operation"].message_type is field.message_type
    assert [f.name for f in method.output_type.fields] == ["outcome"]


def test_every_rpc_is_an_operation_or_served_by_name() -> None:
    operations = {kind.rpc for kind in OPERATIONS}
    others = set(SERVICE.methods_by_name) - operations
    assert others == {
        "CreateVm",
        "GetVm",
        "ListVms",
        "DeleteVm",
        "ListStrategies",
        "DumpLeaves",
        "ExportVm",
        "ImportVm",
        "Execute",
    }
    assert all(callable(getattr(Servicer, name, None)) for name in others)


@pytest.mark.parametrize("kind", OPERATIONS, ids=lambda k: k.name)
def test_the_vm_runs_each_operation_and_units_are_in_field_names(kind: OperationKind) -> None:
    assert callable(getattr(Vm, f"_{kind.name}", None))
    for field in dataclasses.fields(kind.type):
        if "gpa" in field.name or "gfn" in field.name:
            # The API's addresses are byte addresses, named so.
            assert field.name.endswith("gpa"), field.name
