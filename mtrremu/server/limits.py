"""What one server accepts, and the VM table that enforces it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from mtrremu.core.config import VmConfig
from mtrremu.core.errors import InvalidArgument, ResourceExhausted, UnknownVm
from mtrremu.core.units import PAGE_SHIFT, TIB
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager
from mtrremu.rpc.transport import DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Limits:
    """Server limits; exceeding one is RESOURCE_EXHAUSTED (reason LIMIT_EXCEEDED).

    Guest memory also bounds the emulator's own: an EPT takes at most about one byte per
    4 KiB of guest memory (every page a 4 KiB leaf), so 16 TiB of guests cost at most 4 GiB.
    """

    max_vms: int = 64
    #: Guest memory (RAM and device slots) of one VM.
    max_vm_memory_bytes: int = 16 * TIB
    #: Guest memory of all VMs together.
    max_total_memory_bytes: int = 32 * TIB
    #: Operations in one ExecuteRequest (a burst counts each lane operation).
    max_batch_operations: int = 20_000
    #: Largest request message (replies never exceed 4 MiB: Execute streams its results).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_vms", "max_vm_memory_bytes", "max_total_memory_bytes"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} cannot be negative")
        if self.max_batch_operations < 1 or self.max_message_bytes < 1024:
            raise InvalidArgument(
                "max_batch_operations must be at least 1 and max_message_bytes at least 1024"
            )


@dataclass(frozen=True)
class Entry:
    vm: Vm
    options: Mapping[str, str]
    memory_bytes: int
    #: Position in creation order (1, 2, ...), the key ListVms pages by.
    serial: int


class VmTable:
    """The server's VMs. Thread-safe."""

    def __init__(self, limits: Limits, manager: PluginManager) -> None:
        self.limits = limits
        self.manager = manager
        self._vms: dict[str, Entry] = {}
        self._created = 0
        self._lock = threading.Lock()

    def create(
        self,
        config: VmConfig,
        strategy: str,
        options: Mapping[str, str],
        fits: Callable[[Entry], bool],
    ) -> Entry:
        """A new VM, registered only if every limit allows it and ``fits`` accepts it (the
        servicer checks that the answer describing it can be sent)."""
        memory = config.memory_pages << PAGE_SHIFT
        if memory > self.limits.max_vm_memory_bytes:
            raise ResourceExhausted(
                f"the VM's {memory} bytes of guest memory exceed this server's limit of "
                f"{self.limits.max_vm_memory_bytes} per VM"
            )
        with self._lock:
            if len(self._vms) >= self.limits.max_vms:
                raise ResourceExhausted(f"this server already holds its {self.limits.max_vms} VMs")
            total = sum(e.memory_bytes for e in self._vms.values()) + memory
            if total > self.limits.max_total_memory_bytes:
                raise ResourceExhausted(
                    f"guest memory of all VMs would reach {total} bytes, over this server's "
                    f"limit of {self.limits.max_total_memory_bytes}"
                )
            vm = self.manager.create_vm(
                config, strategy or "fine-grained", options, vm_id=f"vm-{uuid.uuid4().hex}"
            )
            entry = Entry(vm, dict(options), memory, self._created + 1)
            if not fits(entry):
                raise ResourceExhausted(
                    "the answer describing this VM would exceed the 4 MiB reply limit; nothing "
                    "was created"
                )
            self._vms[vm.vm_id] = entry
            self._created += 1
            return entry

    def get(self, vm_id: str) -> Entry:
        with self._lock:
            entry = self._vms.get(vm_id)
        if entry is None:
            raise UnknownVm(vm_id)
        return entry

    def vm(self, vm_id: str) -> Vm:
        return self.get(vm_id).vm

    def delete(self, vm_id: str) -> None:
        """Forget the VM and free its EPT at once; a batch running on it stops at its next
        operation."""
        with self._lock:
            entry = self._vms.pop(vm_id, None)
        if entry is None:
            raise UnknownVm(vm_id)
        entry.vm.close()

    def created_after(self, serial: int) -> Iterator[Entry]:
        """The VMs created after the one numbered ``serial``, oldest first."""
        with self._lock:
            # VMs are inserted under this lock: insertion order is creation order.
            entries = list(self._vms.values())
        return (e for e in entries if e.serial > serial)
