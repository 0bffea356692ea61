"""A VM's configuration, fixed at creation (docs/semantics.md#vm-configuration)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from mtrremu.core.errors import InvalidConfig
from mtrremu.core.memtype import Precedence
from mtrremu.core.units import EPT_GFN_LIMIT, GIB, PAGE_SHIFT, PAGE_SIZE, GfnRange, Level

MAX_VCPUS = 4096
#: Non-coherent DMA devices a VM may have attached at once.
MAX_DMA_DEVICES = 65535
MIN_MAXPHYADDR, MAX_MAXPHYADDR = 32, 52
#: Memslots per VM: KVM's KVM_USER_MEM_SLOTS on x86 (SHRT_MAX less its 3 internal slots).
MAX_MEMSLOTS = 32764
#: A memslot name is a label for reports, not data.
MAX_MEMSLOT_NAME = 256


class MemslotKind(enum.Enum):
    """What backs a memslot: ordinary RAM, or device memory (a passthrough BAR), always UC."""

    RAM = "ram"
    DEVICE = "device"


@dataclass(frozen=True)
class Memslot:
    """A gfn range backed by host memory."""

    base_gfn: int
    pages: int
    kind: MemslotKind = MemslotKind.RAM
    name: str = ""

    @classmethod
    def from_bytes(
        cls, base: int, size: int, kind: MemslotKind = MemslotKind.RAM, name: str = ""
    ) -> Memslot:
        """A slot given in bytes; both must be 4 KiB aligned."""
        if base % PAGE_SIZE or size % PAGE_SIZE:
            raise InvalidConfig(f"memslot {name or hex(base)}: base and size must be 4 KiB aligned")
        return cls(base >> PAGE_SHIFT, size >> PAGE_SHIFT, kind, name)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.pages

    @property
    def gfns(self) -> GfnRange:
        return GfnRange(self.base_gfn, self.end_gfn)

    def __str__(self) -> str:
        label = self.name or self.kind.value
        return f"{label} gpa [{self.base_gfn << PAGE_SHIFT:#x}, {self.end_gfn << PAGE_SHIFT:#x})"


def _default_memslots() -> tuple[Memslot, ...]:
    return (Memslot.from_bytes(0, 4 * GIB, name="ram"),)


@dataclass(frozen=True)
class VmConfig:
    """Everything fixed when a VM is created. Invalid combinations raise :class:`InvalidConfig`."""

    vcpus: int = 1
    quirk_cd_nw_cleared: bool = True
    feature_mtrr: bool = True
    tdp: bool = True
    #: Non-coherent DMA devices attached at creation: configuration, not an event.
    noncoherent_dma: int = 0
    guest_maxphyaddr: int = 40
    memslots: tuple[Memslot, ...] = field(default_factory=_default_memslots)
    max_mapping_level: Level = Level.G1
    precedence: Precedence = Precedence.KVM
    #: Reproduce patch 9's posted lost-wakeup window in the zap list (off: the fixed protocol).
    zap_list_posted_window: bool = False
    #: Run the staleness oracle at every quiescent point after a memtype-relevant change
    #: (see :class:`mtrremu.core.vm.StalenessLog`); meant for single-threaded replays.
    track_staleness: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise InvalidConfig(f"vcpus must be between 1 and {MAX_VCPUS}, got {self.vcpus}")
        if not MIN_MAXPHYADDR <= self.guest_maxphyaddr <= MAX_MAXPHYADDR:
            raise InvalidConfig(
                f"guest_maxphyaddr must be between {MIN_MAXPHYADDR} and {MAX_MAXPHYADDR}, "
                f"got {self.guest_maxphyaddr}"
            )
        if not 0 <= self.noncoherent_dma <= MAX_DMA_DEVICES:
            raise InvalidConfig(
                f"noncoherent_dma must be between 0 and {MAX_DMA_DEVICES}, "
                f"got {self.noncoherent_dma}"
            )
        if self.max_mapping_level not in (Level.K4, Level.M2, Level.G1):
            raise InvalidConfig(
                f"max_mapping_level must be 4K, 2M or 1G, got {self.max_mapping_level}"
            )
        if not 1 <= len(self.memslots) <= MAX_MEMSLOTS:
            raise InvalidConfig(
                f"a VM needs between 1 and {MAX_MEMSLOTS} memslots, got {len(self.memslots)}"
            )
        limit = min(1 << (self.guest_maxphyaddr - PAGE_SHIFT), EPT_GFN_LIMIT)
        ordered = sorted(self.memslots, key=lambda s: s.base_gfn)
        for slot in ordered:
            if slot.pages <= 0 or slot.base_gfn < 0:
                raise InvalidConfig(f"memslot {slot.name or slot.base_gfn}: empty or negative")
            if len(slot.name) > MAX_MEMSLOT_NAME:
                raise InvalidConfig(
                    f"memslot at gfn {slot.base_gfn:#x}: a name of {len(slot.name)} characters; "
                    f"the limit is {MAX_MEMSLOT_NAME}"
                )
            if slot.end_gfn > limit:
                raise InvalidConfig(
                    f"memslot {slot} ends beyond the guest-physical space "
                    f"(MAXPHYADDR {self.guest_maxphyaddr}, 4-level EPT)"
                )
        for before, after in itertools.pairwise(ordered):
            if after.base_gfn < before.end_gfn:
                raise InvalidConfig(f"memslots overlap: {before} and {after}")

    @property
    def memory_pages(self) -> int:
        """Guest memory (RAM and device slots) in 4 KiB pages."""
        return sum(slot.pages for slot in self.memslots)

    def sorted_memslots(self) -> tuple[Memslot, ...]:
        return tuple(sorted(self.memslots, key=lambda s: s.base_gfn))
