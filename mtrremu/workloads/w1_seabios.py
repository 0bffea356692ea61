"""W1: SeaBIOS → Linux on q35 [coreboot/seabios src/romlayout.S, src/post.c, src/fw/shadow.c,
src/fw/mtrr.c, src/fw/smp.c, src/optionroms.c; qemu hw/i386/x86.c, hw/display/vga-pci.c].

In order (every touch is a guest access: it installs a leaf of the type the touching vCPU's
state gives at that moment, and is no zap event):

1. QEMU pushes the 28 MTRR MSRs (zero, host-initiated, defType first) on every vCPU, twice:
   after machine init and on the system reset that follows; CR0 is the reset value (CD=1).
2. The BSP at reset, CD=1: the reset vector in the top page of the BIOS image below 4 GiB,
   ``entry_post`` in the F-segment (0xFE05B) and the descriptor tables ``transition32`` loads.
3. ``transition32`` clears CR0.CD/NW (a guest CD 1→0).
4. POST with MTRRs still disabled (UC): ``make_bios_writable`` copies the BIOS from its image
   below 4 GiB into 0xC0000-0xFFFFF; the stack below 0x7000, the IVT/BDA, the EBDA, the
   SMM set-up pages, and the init code ``reloc_preinit`` moves below ZoneHigh.
5. ``mtrr_setup`` on the BSP, no CD toggle (31 writes): defType ← 0; 0x250, 0x258 ← WB;
   0x259 ← UC; 0x268-0x26F ← WP; all 16 variable MSRs ← 0; pair 0 ← UC over
   [``pcimem_start``, 4 GiB); defType ← 0xC06.
6. ``smp_scan``: the BSP writes the AP trampoline at 0x10000 and sends INIT-SIPI. Every AP, at
   CD=1 from reset, runs the trampoline, ``entry_smp`` and the descriptor loads, then clears
   CD in the same ``transition32`` and spins for ``SMPLock`` — all APs at once, a burst the
   spinning BSP is part of.
7. One AP at a time under the lock: ``handle_smp`` on the BSP's stack replays the same 31
   writes from ``smp_msr`` (MTRRs disabled until the last one), counts itself in ``CountCPUs``
   and halts in ``entry_smp``; the BSP re-reads ``CountCPUs`` meanwhile.
8. The rest of POST on the BSP: ACPI/SMBIOS tables in ZoneHigh, ``vgarom_setup`` clears the
   option-ROM area and runs the VGA BIOS at 0xC0000 (its text-mode screen and font go through
   the legacy VGA window, which is QEMU MMIO), ``prepareboot`` checksums the F-segment,
   ``startBoot`` clears 0x7000-0x8FFFF and loads the boot sector.
9. Linux (:func:`linux_boot`), BIOS boot; fbcon paints the std VGA's framebuffer (BAR0 at
   ``vram``, in the UC range), a RAM memslot of QEMU's.

The F- and E-segment addresses come from a QEMU build of SeaBIOS (``bios-256k.bin``, q35's
default); they move with the version and configuration, so they are parameters
(:class:`SeabiosLayout`). KVM also zaps everything when QEMU deletes a memslot (SeaBIOS's PAM
writes, ROM BARs switched off, the guest sizing BARs); memslots are fixed here, so those zaps
are not replayed and a strategy cannot lean on them.

Zap events ("zap cnt"), N vCPUs, N-1 APs:

=====================================  ===========  ===========
events                                  Base1        Base2
=====================================  ===========  ===========
reset pushes: defType write, 2xN        2N           0 (CD=1)
BSP CD clear                            0            1
BSP ``mtrr_setup``: defType x2          2            2
AP CD-clear burst                       0            N-1
AP replays: defType x2 each             2(N-1)       2(N-1)
Linux BSP ``cache_cpu_init``            2 (defType)  2 (CD flips)
``cache_aps_init``, N CPUs              2N           2N
total (N = 8)                           50           42
=====================================  ===========  ===========

(Range writes in the setups happen with E=0 and are not zap events; under Base2 the defType
writes inside ``cache_cpu_init`` happen with CD=1.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.units import GIB, KIB, MIB
from mtrremu.workloads.building import (
    EBDA_PAGE,
    LOCAL_APIC,
    VGA_TEXT,
    WB_BYTES,
    WP_BYTES,
    Handover,
    LinuxParams,
    TraceBuilder,
    linux_boot,
    qemu_reset_push,
    var_pairs,
)
from mtrremu.workloads.layouts import FOUR_GIB, low_ram_end, q35
from mtrremu.workloads.trace import Trace

#: CR0 after ``transition32``: PE and ET; PG, CD and NW cleared.
SEABIOS_CR0 = 0x11
#: Where SeaBIOS puts the AP trampoline (``BUILD_AP_BOOT_ADDR``, fixed).
AP_BOOT = 0x10000
#: The legacy VGA window's first page (font loads in text mode; QEMU MMIO).
VGA_WINDOW = 0xA0000


@dataclass(frozen=True)
class SeabiosLayout:
    """Where a SeaBIOS build keeps what the boot touches (defaults: a 256 KiB QEMU build)."""

    #: The BIOS image mapped just below 4 GiB (``bios-256k.bin``).
    image_size: int = 256 * KIB
    #: ``code32flat_start``: ``make_bios_writable`` copies [this, 1 MiB) from the image.
    code_start: int = 0xD3DE0
    #: ``entry_post`` (0xFE05B, fixed) and ``transition32``.
    entry_page: int = 0xFE000
    #: ``HaveRunPost``, ``pmode_IDT_info`` and ``rombios32_gdt_48``.
    descriptors_page: int = 0xF6000
    #: ``handle_post`` and ``handle_smp``.
    post_code_page: int = 0xF0000
    #: ``entry_smp`` (where APs halt afterwards).
    smp_entry_page: int = 0xFD000
    #: ``SMPLock``, ``CountCPUs``, ``smp_msr``, ``FoundAPICIDs``.
    smp_vars_page: int = 0xF4000
    #: Runtime code an AP calls (``apic_id_init``, ``smp_write_msrs``, ``dprintf``).
    runtime_code_page: int = 0xEA000
    #: The POST stack grows down from 0x7000; APs borrow the BSP's (``SMPStack``).
    stack_page: int = 0x6000
    #: ``reloc_preinit``'s copy of the init code, just below ZoneHigh.
    init_code_size: int = 84 * KIB
    #: ZoneHigh at the top of low RAM (16 MiB since SeaBIOS 1.16.1); the ACPI tables are
    #: allocated top-down in it.
    zone_high: int = 16 * MIB
    acpi_tables: int = 128 * KIB
    #: The SMM relocation pages ``smm_setup`` saves and restores (the entry stub, the state).
    smm_entry_page: int = 0x38000
    smm_state_page: int = 0x3F000
    #: ``vgarom_setup`` clears the option-ROM area up to ZoneLow's lowest allocation; the VGA
    #: BIOS (SeaVGABIOS, about 39 KiB) runs from 0xC0000.
    rom_area_end: int = 0xE9000
    vga_rom_size: int = 40 * KIB
    #: Where the RSDP ends up in the F-segment (Linux's scan stops there).
    rsdp: int = 0xF5000


@dataclass(frozen=True)
class Params:
    vcpus: int = 8
    ram: int = 16 * GIB
    #: Start of the 32-bit PCI memory window SeaBIOS covers with a UC pair (q35: 3 GiB).
    pcimem_start: int = 0xC0000000
    #: Where SeaBIOS puts the std VGA's 16 MiB BAR0 (top-down in the PCI window).
    vram: int = 0xFD000000
    #: Order APs take the SMP lock: "ascending" or "seeded".
    ap_order: str = "ascending"
    seabios: SeabiosLayout = field(default_factory=SeabiosLayout)
    linux: LinuxParams = field(default_factory=LinuxParams)


def mtrr_setup(b: TraceBuilder, vcpu: int, pcimem_start: int) -> list[VcpuOp]:
    """SeaBIOS ``mtrr_setup``: the 31 writes, in order."""
    size = (1 << 32) - pcimem_start
    ops: list[VcpuOp] = [b.wrmsr(vcpu, msrs.DEFTYPE, 0)]
    fixed = {msrs.FIX16K_80000: WB_BYTES, msrs.FIX64K_00000: WB_BYTES, msrs.FIX16K_A0000: 0}
    ops += [b.wrmsr(vcpu, msr, fixed.get(msr, WP_BYTES)) for msr in msrs.FIXED_MSRS]
    ops += [b.wrmsr(vcpu, msr, 0) for msr in msrs.VAR_MSRS]
    ops += var_pairs(b, vcpu, [(pcimem_start, size)])
    ops.append(b.wrmsr(vcpu, msrs.DEFTYPE, 0xC06))
    return ops


def post_before_mtrrs(b: TraceBuilder, layout: SeabiosLayout, low_top: int) -> None:
    """The BSP from ``handle_post`` to ``mtrr_setup`` (CD=0, MTRRs disabled)."""
    code = layout.code_start & ~0xFFF
    b.touch(0, FOUR_GIB - (0x100000 - code), 0x100000 - code)  # the copy's source
    b.touch(0, code, 0x100000 - code)  # ... and destination
    pages = (layout.stack_page, 0, EBDA_PAGE, layout.smm_entry_page, layout.smm_state_page)
    b.add(b.pages(0, *pages))
    b.touch(0, low_top - layout.zone_high - layout.init_code_size, layout.init_code_size)


def ap_wakeup(b: TraceBuilder, ap: int, layout: SeabiosLayout) -> list[VcpuOp]:
    """An AP from INIT-SIPI to spinning for ``SMPLock``: CD=1, then ``transition32``."""
    entry = b.pages(ap, AP_BOOT, layout.smp_entry_page, layout.entry_page, layout.descriptors_page)
    spin = b.pages(ap, layout.descriptors_page, layout.smp_vars_page)
    return [b.init(ap), *entry, b.write_cr0(ap, SEABIOS_CR0), *spin]


def ap_setup(b: TraceBuilder, ap: int, params: Params) -> list[VcpuOp]:
    """One AP under ``SMPLock``: ``handle_smp`` replays the BSP's writes, counts itself, halts."""
    layout = params.seabios
    writes = mtrr_setup(b, ap, params.pcimem_start)
    handle_smp = b.pages(ap, layout.stack_page, layout.post_code_page, layout.runtime_code_page)
    replay = b.pages(ap, layout.post_code_page, layout.smp_vars_page)
    done = b.pages(ap, layout.smp_vars_page, layout.smp_entry_page)
    return [*handle_smp, writes[0], *replay, *writes[1:], *done]


def build(params: Params, seed: int = 1) -> Trace:
    layout = params.seabios
    slots = q35(params.ram, flash=layout.image_size, vram=params.vram)
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=slots)
    low_top = low_ram_end(slots)
    b = TraceBuilder(config, seed)
    qemu_reset_push(b)
    qemu_reset_push(b)
    b.add(b.pages(0, FOUR_GIB - 0x1000, layout.entry_page, layout.descriptors_page))
    b.add([b.write_cr0(0, SEABIOS_CR0)])
    post_before_mtrrs(b, layout, low_top)
    b.add(mtrr_setup(b, 0, params.pcimem_start))
    smp_scan = [layout.runtime_code_page, layout.stack_page, AP_BOOT, layout.smp_vars_page]
    b.add(b.pages(0, *smp_scan, LOCAL_APIC))
    aps = [ap for ap in b.vcpus if ap]
    lanes = {ap: ap_wakeup(b, ap, layout) for ap in aps}
    if lanes:
        spinning = b.pages(0, layout.smp_vars_page, layout.stack_page)
        lanes[0] = spinning * (max(len(ops) for ops in lanes.values()) // 2)
    b.burst(lanes)
    if params.ap_order == "seeded":
        b.shuffle(aps)
    for ap in aps:
        b.add(ap_setup(b, ap, params))
        b.add(b.pages(0, layout.smp_vars_page))
    b.touch(0, low_top - layout.acpi_tables, layout.acpi_tables)
    b.touch(0, 0xC0000, layout.rom_area_end - 0xC0000)
    b.touch(0, 0xC0000, layout.vga_rom_size)
    b.add(b.pages(0, VGA_WINDOW, VGA_TEXT))
    b.touch(0, 0xF0000, 0x10000)
    b.touch(0, 0x7000, 0x90000 - 0x7000)
    linux_boot(b, params.linux, Handover(efi=False, rsdp=layout.rsdp, vram=params.vram))
    return b.trace("W1", params)
