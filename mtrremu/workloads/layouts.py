"""Guest-physical memory layouts of the VMMs the workloads stand for."""

from __future__ import annotations

from mtrremu.core.config import Memslot
from mtrremu.core.units import GIB, KIB, MIB, PAGE_SHIFT

FOUR_GIB = 4 * GIB


#: QEMU's std VGA (the q35 default display): 16 MiB of video RAM behind BAR0.
VGA_VRAM_SIZE = 16 * MIB


def q35(
    ram: int, *, flash: int = 256 * KIB, tseg: int = 0, vram: int | None = None
) -> tuple[Memslot, ...]:
    """QEMU q35: with at least 2.75 GiB of RAM, 2 GiB of it below 4 GiB, the rest from 4 GiB.

    [0xA0000, 0xC0000) is VGA MMIO (no memslot); the PCI hole [2 GiB, 4 GiB) holds MMCONFIG,
    BARs, the IOAPIC and LAPIC (no memslot); ``flash`` (the firmware image) sits just below
    4 GiB; ``tseg`` bytes at the top of low RAM are SMRAM, not ordinary RAM (OVMF with SMM).
    ``vram``: where the firmware put the std VGA's BAR0: its video RAM is ordinary host RAM, so
    QEMU gives it a RAM memslot there (its memory type follows the guest's MTRRs).
    """
    low = 2 * GIB if ram >= 2816 * MIB else ram
    slots = [
        Memslot.from_bytes(0, 0xA0000, name="ram-below-vga"),
        Memslot.from_bytes(0xC0000, low - tseg - 0xC0000, name="ram-low"),
    ]
    if ram > low:
        slots.append(Memslot.from_bytes(FOUR_GIB, ram - low, name="ram-high"))
    if flash:
        slots.append(Memslot.from_bytes(FOUR_GIB - flash, flash, name="flash"))
    if vram is not None:
        slots.append(Memslot.from_bytes(vram, VGA_VRAM_SIZE, name="vga-vram"))
    return tuple(slots)


def low_ram_end(slots: tuple[Memslot, ...]) -> int:
    """Where q35's RAM below 4 GiB ends (below TSEG): firmware keeps its tables at the top."""
    return next(s.end_gfn for s in slots if s.name == "ram-low") << PAGE_SHIFT


def direct(ram: int, *, mmio_gap_start: int = 0xD0000000) -> tuple[Memslot, ...]:
    """Firecracker, Cloud Hypervisor and crosvm: RAM from 0 up to the 32-bit MMIO gap (default
    0xD0000000), the rest from 4 GiB."""
    low = min(ram, mmio_gap_start)
    slots = [Memslot.from_bytes(0, low, name="ram-low")]
    if ram > low:
        slots.append(Memslot.from_bytes(FOUR_GIB, ram - low, name="ram-high"))
    return tuple(slots)
