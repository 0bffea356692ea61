"""Domain errors. A guest mistake is never one of these: it is a #GP in the event's result.

Each class names the gRPC-style status a front end should map it to and a stable reason, and
registers itself in :data:`BY_REASON` when it is defined, so the servicer and the client stay
table lookups and the core never imports grpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class MtrremuError(Exception):
    """Base of every error the emulator raises on purpose."""

    #: The canonical status name a front end reports this as.
    status: ClassVar[str] = "INTERNAL"
    #: A stable machine-readable reason (google.rpc.ErrorInfo.reason).
    reason: ClassVar[str] = "MTRREMU_ERROR"

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        known = BY_REASON.setdefault(cls.reason, cls)
        if known is not cls and not issubclass(cls, known):
            raise TypeError(f"{cls.__name__} reuses reason {cls.reason!r} of {known.__name__}")

    def metadata(self) -> dict[str, str]:
        """Machine-readable details a front end attaches (google.rpc.ErrorInfo.metadata)."""
        return {}

    @classmethod
    def from_metadata(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError | None:
        """The error a front end received, rebuilt from its message and :meth:`metadata`, or
        ``None`` if the metadata does not fit this class."""
        try:
            return cls._rebuild(message, metadata)
        except (KeyError, ValueError, TypeError):
            return None

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(message)


#: Every error class by its reason (a subclass that keeps its base's reason does not replace it).
BY_REASON: dict[str, type[MtrremuError]] = {MtrremuError.reason: MtrremuError}


class InvalidArgument(MtrremuError):
    """The request itself is malformed: the state it names exists, the values do not fit."""

    status = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class InvalidConfig(InvalidArgument):
    """A VM configuration that cannot be built (memslots overlap, bad MAXPHYADDR, ...)."""

    reason = "INVALID_VM_CONFIG"


class InvalidSnapshot(InvalidArgument):
    """A snapshot that cannot be loaded: not a snapshot, truncated, corrupted, of an unknown
    format version, failing its checksum, or holding a state the emulator would refuse. The
    message says which; nothing was created."""

    reason = "SNAPSHOT_INVALID"


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

    def metadata(self) -> dict[str, str]:
        return {"register": self.register, "value": hex(self.value), "why": self.why}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(metadata["register"], int(metadata["value"], 16), metadata["why"])


class NotFound(MtrremuError):
    """The request names a VM, vCPU or strategy that does not exist."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class UnknownVm(NotFound):
    """The request names a VM this server does not hold (ids are never reused)."""

    reason = "VM_NOT_FOUND"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"VM {vm_id!r} does not exist")
        self.vm_id = vm_id

    def __reduce__(self) -> tuple[type[UnknownVm], tuple[str]]:
        return (UnknownVm, (self.vm_id,))

    def metadata(self) -> dict[str, str]:
        return {"vm_id": self.vm_id}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(metadata["vm_id"])


class PermissionDenied(MtrremuError):
    """The caller may not act on what it names."""

    status = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class NotOwned(PermissionDenied):
    """The request names a VM another client owns (servers with several tokens)."""

    reason = "VM_NOT_OWNED"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"VM {vm_id!r} belongs to another client")
        self.vm_id = vm_id

    def __reduce__(self) -> tuple[type[NotOwned], tuple[str]]:
        return (NotOwned, (self.vm_id,))

    def metadata(self) -> dict[str, str]:
        return {"vm_id": self.vm_id}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(metadata["vm_id"])


class UnknownVcpu(NotFound):
    """The request names a vCPU index the VM does not have."""

    reason = "VCPU_NOT_FOUND"

    def __init__(self, vcpu: int, vcpus: int) -> None:
        super().__init__(f"vCPU {vcpu} does not exist (the VM has {vcpus})")
        self.vcpu = vcpu
        self.vcpus = vcpus

    def __reduce__(self) -> tuple[type[UnknownVcpu], tuple[int, int]]:
        return (UnknownVcpu, (self.vcpu, self.vcpus))

    def metadata(self) -> dict[str, str]:
        return {"vcpu": str(self.vcpu), "vcpus": str(self.vcpus)}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(int(metadata["vcpu"]), int(metadata["vcpus"]))


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


class BrokenStrategy(FailedPrecondition):
    """A strategy plugin could not build a usable strategy object (its factory raised, or what
    it built lacks a method of the strategy protocol). The message names the plugin's
    distribution and what went wrong."""

    reason = "STRATEGY_BROKEN"

    def __init__(self, strategy: str, origin: str, why: str) -> None:
        super().__init__(f"strategy {strategy!r} ({origin}) is broken: {why}")
        self.strategy = strategy
        self.origin = origin
        self.why = why

    def __reduce__(self) -> tuple[type[BrokenStrategy], tuple[str, str, str]]:
        return (BrokenStrategy, (self.strategy, self.origin, self.why))

    def metadata(self) -> dict[str, str]:
        return {"strategy": self.strategy, "origin": self.origin, "why": self.why}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(metadata["strategy"], metadata["origin"], metadata["why"])


class BrokenPlugin(FailedPrecondition):
    """An installed plugin that could not be loaded: it failed to import, pluggy refused its
    hook implementations, its ``mtrremu_strategies`` raised or returned something other than
    :class:`~mtrremu.plugin.StrategySpec` records. The message names the plugin, its
    distribution and version (``origin``) and what went wrong; the other plugins still load."""

    reason = "PLUGIN_BROKEN"

    def __init__(self, plugin: str, origin: str, why: str) -> None:
        super().__init__(f"plugin {plugin!r} ({origin}) is broken: {why}")
        self.plugin = plugin
        self.origin = origin
        self.why = why

    def __reduce__(self) -> tuple[type[BrokenPlugin], tuple[str, str, str]]:
        return (type(self), (self.plugin, self.origin, self.why))

    def metadata(self) -> dict[str, str]:
        return {"plugin": self.plugin, "origin": self.origin, "why": self.why}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(metadata["plugin"], metadata["origin"], metadata["why"])


class IncompatiblePlugin(BrokenPlugin):
    """A plugin built for a newer hookspec version than this mtrremu supports (its module's
    ``MTRREMU_HOOKSPEC_VERSION``); it is refused before any of its code is called."""

    reason = "PLUGIN_INCOMPATIBLE"
