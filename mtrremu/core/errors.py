"""Domain errors. A guest mistake is never one of these: it is a #GP in the event's result.

Each class names the gRPC-style status a front end should map it to, so the servicer stays a
table lookup and the core never imports grpc.
"""

from __future__ import annotations


class MtrremuError(Exception):
    """Base of every error the emulator raises on purpose."""

    #: The canonical status name a front end reports this as.
    status = "INTERNAL"
    #: A stable machine-readable reason (google.rpc.ErrorInfo.reason).
    reason = "MTRREMU_ERROR"


class InvalidArgument(MtrremuError):
    """The request itself is malformed: the state it names exists, the values do not fit."""

    status = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class InvalidConfig(InvalidArgument):
    """A VM configuration that cannot be built (memslots overlap, bad MAXPHYADDR, ...)."""

    reason = "INVALID_VM_CONFIG"


class RejectedHostWrite(InvalidArgument):
    """A host-initiated write KVM refuses (KVM_SET_MSRS / KVM_SET_SREGS fail); nothing changed."""

    reason = "HOST_WRITE_REJECTED"

    def __init__(self, register: str, value: int, why: str) -> None:
        super().__init__(f"host write of {value:#x} to {register} rejected: {why}")
        self.register = register
        self.value = value
        self.why = why

    def __reduce__(self) -> tuple[type[RejectedHostWrite], tuple[str, int, str]]:
        return (RejectedHostWrite, (self.register, self.value, self.why))


class NotFound(MtrremuError):
    """The request names a VM, vCPU or strategy that does not exist."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class UnknownStrategy(NotFound):
    """No installed plugin provides the requested strategy name."""

    reason = "UNKNOWN_STRATEGY"


class FailedPrecondition(MtrremuError):
    """A valid request in the wrong state (e.g. detaching DMA while none is attached)."""

    status = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(MtrremuError):
    """A configured limit would be exceeded (VMs, guest memory, DMA devices, batch size)."""

    status = "RESOURCE_EXHAUSTED"
    reason = "LIMIT_EXCEEDED"


class PluginConflict(MtrremuError):
    """Two plugins register the same strategy name; the message names both."""

    status = "FAILED_PRECONDITION"
    reason = "PLUGIN_CONFLICT"
