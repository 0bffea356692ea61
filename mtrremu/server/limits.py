"""What one server accepts, and the VM table that enforces it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from mtrremu.core.config import VmConfig
from mtrremu.core.errors import InvalidArgument, NotOwned, ResourceExhausted, UnknownVm
from mtrremu.core.units import GIB, PAGE_SHIFT, TIB
from mtrremu.core.vm import Vm
from mtrremu.core.vm_state import VmState, restore
from mtrremu.plugin.manager import PluginManager
from mtrremu.rpc.transport import DEFAULT_MAX_MESSAGE_BYTES
from mtrremu.server.clients import DEFAULT_CLIENT


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
    #: Largest snapshot ImportVm accepts (held in a temporary file while it arrives; an EPT
    #: takes at most about a byte per 4 KiB page, so 5 GiB holds any VM of 16 TiB).
    max_snapshot_bytes: int = 5 * GIB

    def __post_init__(self) -> None:
        for name in (
            "max_vms",
            "max_vm_memory_bytes",
            "max_total_memory_bytes",
            "max_snapshot_bytes",
        ):
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
    #: The client that created it, the only one that may use it (docs/api.md#clients).
    owner: str


class VmTable:
    """The server's VMs. Thread-safe."""

    def __init__(self, limits: Limits, manager: PluginManager) -> None:
        self.limits = limits
        self.manager = manager
        self._vms: dict[str, Entry] = {}
        self._created = 0
        #: VMs being built (and their guest memory), counted against the limits meanwhile.
        self._building = 0
        self._building_bytes = 0
        self._lock = threading.Lock()
        #: Called with a VM's id once it is deleted (the state directory forgets it).
        self.on_deleted: Callable[[str], None] | None = None

    def create(
        self,
        config: VmConfig,
        strategy: str,
        options: Mapping[str, str],
        fits: Callable[[Entry], bool],
        *,
        state: VmState | None = None,
        vm_id: str | None = None,
        owner: str = DEFAULT_CLIENT,
    ) -> Entry:
        """A new VM, registered only if every limit allows it and ``fits`` accepts it (the
        servicer checks that the answer describing it can be sent). With ``state`` (a
        snapshot's, whose configuration and strategy are the ones given), the VM is loaded
        with it; a state the emulator refuses creates nothing. ``vm_id``: the id to use (a
        restored VM keeps its own), else a new random one; ``owner``: the client it belongs to."""
        memory = self.admit(config)
        with self._lock:
            if len(self._vms) + self._building >= self.limits.max_vms:
                raise ResourceExhausted(f"this server already holds its {self.limits.max_vms} VMs")
            total = sum(e.memory_bytes for e in self._vms.values()) + self._building_bytes
            if total + memory > self.limits.max_total_memory_bytes:
                raise ResourceExhausted(
                    f"guest memory of all VMs would reach {total + memory} bytes, over this "
                    f"server's limit of {self.limits.max_total_memory_bytes}"
                )
            if vm_id is not None and vm_id in self._vms:
                raise InvalidArgument(f"VM {vm_id!r} already exists")
            self._building += 1
            self._building_bytes += memory
        try:
            # Built outside the table's lock: loading a large snapshot takes a while.
            vm_id = vm_id or f"vm-{uuid.uuid4().hex}"
            vm = self.manager.create_vm(config, strategy or "fine-grained", options, vm_id=vm_id)
            if state is not None:
                restore(vm, state)
            with self._lock:
                entry = Entry(vm, dict(options), memory, self._created + 1, owner)
                if vm_id in self._vms:
                    raise InvalidArgument(f"VM {vm_id!r} already exists")
                if not fits(entry):
                    raise ResourceExhausted(
                        "the answer describing this VM would exceed the 4 MiB reply limit; "
                        "nothing was created"
                    )
                self._vms[vm_id] = entry
                self._created += 1
                return entry
        finally:
            with self._lock:
                self._building -= 1
                self._building_bytes -= memory

    def admit(self, config: VmConfig) -> int:
        """The guest memory of a VM of ``config``, if one VM may have that much (else
        RESOURCE_EXHAUSTED); whether all VMs together may is checked at creation."""
        memory = config.memory_pages << PAGE_SHIFT
        if memory > self.limits.max_vm_memory_bytes:
            raise ResourceExhausted(
                f"the VM's {memory} bytes of guest memory exceed this server's limit of "
                f"{self.limits.max_vm_memory_bytes} per VM"
            )
        return memory

    def get(self, vm_id: str, owner: str) -> Entry:
        """The VM ``vm_id``, which ``owner`` must own."""
        with self._lock:
            entry = self._vms.get(vm_id)
        if entry is None:
            raise UnknownVm(vm_id)
        if entry.owner != owner:
            raise NotOwned(vm_id)
        return entry

    def vm(self, vm_id: str, owner: str) -> Vm:
        return self.get(vm_id, owner).vm

    def delete(self, vm_id: str, owner: str) -> None:
        """Forget the VM and free its EPT at once; a batch running on it stops at its next
        operation."""
        with self._lock:
            entry = self._vms.get(vm_id)
            if entry is not None and entry.owner == owner:
                del self._vms[vm_id]
        if entry is None:
            raise UnknownVm(vm_id)
        if entry.owner != owner:
            raise NotOwned(vm_id)
        entry.vm.close()
        if self.on_deleted is not None:
            self.on_deleted(vm_id)

    def entries(self) -> list[Entry]:
        """Every VM, oldest first."""
        with self._lock:
            # VMs are inserted under this lock: insertion order is creation order.
            return list(self._vms.values())

    def created_after(self, serial: int, owner: str) -> Iterator[Entry]:
        """``owner``'s VMs created after the one numbered ``serial``, oldest first."""
        return (e for e in self.entries() if e.serial > serial and e.owner == owner)
