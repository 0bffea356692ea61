"""The operations, described once. Every form of an operation derives from its row here:

* its dataclass (:mod:`mtrremu.core.events`) and the :class:`~mtrremu.core.vm.Vm` method that
  runs it (``Vm._<name>``), dispatched by :meth:`~mtrremu.core.vm.Vm.apply`;
* its JSON Lines trace record (``{"op": <name>, <field>: ...}``, :mod:`mtrremu.workloads.trace`);
* its protobuf message: the ``Operation`` oneof field ``<name>`` of type ``<Rpc>Operation``,
  and its unary RPC ``<Rpc>`` taking ``<Rpc>Request {vm_id, operation}`` and answering
  ``<Rpc>Response {outcome}``, where ``<Rpc>`` is the name in CamelCase
  (:mod:`mtrremu.rpc.convert`, :mod:`mtrremu.server.servicer`);
* its client call (:meth:`mtrremu.client.RemoteVm.apply`).

Fields carry their unit in their name (``gpa``, ``start_gpa``: byte addresses). A field named
``host`` is the protobuf ``initiator``; a tuple of :class:`~mtrremu.core.events.MsrValue` is a
repeated message of ``msr`` and ``value``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mtrremu.core.events import (
    Access,
    AttachDma,
    CheckStaleness,
    DetachDma,
    FaultRange,
    Init,
    LookupGpa,
    ReadCounters,
    ReadMsr,
    ReadVcpuState,
    Reset,
    WriteCr0,
    WriteMsr,
    WriteMsrs,
)


@dataclass(frozen=True)
class OperationKind:
    """One kind of operation. The derived attributes are computed once: converters read them
    for every operation of a batch."""

    #: The trace's ``op`` and the protobuf oneof field.
    name: str
    type: type[Any]
    #: What it does, in one line.
    summary: str
    #: Its unary RPC (and the stem of its protobuf message names).
    rpc: str = field(init=False)
    #: The dataclass fields of ``type``, in order.
    fields: tuple[dataclasses.Field[Any], ...] = field(init=False)
    #: An operation on one vCPU: a burst lane may hold it (the oracle's ``vcpu`` is only the
    #: point of view of a read, so it may not).
    per_vcpu: bool = field(init=False)

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self.type)
        object.__setattr__(self, "rpc", "".join(p.capitalize() for p in self.name.split("_")))
        object.__setattr__(self, "fields", fields)
        per_vcpu = any(f.name == "vcpu" for f in fields) and self.type is not CheckStaleness
        object.__setattr__(self, "per_vcpu", per_vcpu)


OPERATIONS: tuple[OperationKind, ...] = (
    OperationKind("write_msr", WriteMsr, "WRMSR by the guest, or a host write (KVM_SET_MSRS)"),
    OperationKind(
        "write_msrs", WriteMsrs, "host writes in order, stopping at the first refused one"
    ),
    OperationKind("read_msr", ReadMsr, "RDMSR by the guest, or a host read (KVM_GET_MSRS)"),
    OperationKind("write_cr0", WriteCr0, "MOV to CR0, or a host write (KVM_SET_SREGS)"),
    OperationKind("reset_vcpu", Reset, "RESET: CR0 = 0x60000010, no zap"),
    OperationKind("init_vcpu", Init, "INIT: CR0 reset but CD and NW kept, no zap"),
    OperationKind("access_gpa", Access, "a guest touch of one page: hit, fault or MMIO exit"),
    OperationKind("fault_range", FaultRange, "the guest touching every page of a range"),
    OperationKind("read_vcpu_state", ReadVcpuState, "CR0, PAT and every MTRR MSR of a vCPU"),
    OperationKind("attach_dma", AttachDma, "attach a non-coherent DMA device (0->1 zaps)"),
    OperationKind("detach_dma", DetachDma, "detach one (1->0 zaps)"),
    OperationKind("lookup_gpa", LookupGpa, "the EPT entry of one page"),
    OperationKind("read_counters", ReadCounters, "the VM's counters"),
    OperationKind("check_staleness", CheckStaleness, "the staleness oracle now"),
)
BY_NAME: dict[str, OperationKind] = {kind.name: kind for kind in OPERATIONS}
BY_TYPE: dict[type[Any], OperationKind] = {kind.type: kind for kind in OPERATIONS}
