"""W2: OVMF → Linux on q35, as edk2 stood when the series was measured (mid-2023)
[tianocore/edk2 UefiCpuPkg/ResetVector/Vtf0, OvmfPkg/Sec/SecMain.c, OvmfPkg/PlatformPei,
OvmfPkg/Library/PlatformInitLib/MemDetect.c, UefiCpuPkg/Library/MtrrLib/MtrrLib.c,
UefiCpuPkg/Library/MpInitLib/MpLib.c, CpuDxe/CpuDxe.c, OvmfPkg/QemuVideoDxe].

Every MTRR change is wrapped as: CR0.CD ← 1 · defType ← current with E cleared (FE and the
default type kept: ``MtrrLibPreMtrrChange`` writes ``DefType.Bits.E = 0`` only) · writes ·
defType ← new value (E set; ``MtrrLibPostMtrrChange`` sets E and FE, ``MtrrSetAllMtrrs``
writes the table's value) · CR0.CD ← 0; setting CD when it is already 1 is no flip.
``MtrrSetAllMtrrs`` (set-all) writes all 11 fixed and 16 variable MSRs; ``MtrrSetMemoryAttribute``
(set-attribute) writes only those that change. In order (touches are guest accesses, no zap
events; each installs a leaf of the type the touching vCPU's state gives then):

1. QEMU's two reset pushes (as W1).
2. The reset vector loads ``ovmf_reset_cr0`` (default 0x40000023: CD=1, no flip; newer edk2
   loads 0x23: a CD flip). SEC and early PEI run at CD=1 with MTRRs off: the reset vector at
   the top of the flash, SEC's scan of every page header down to its volume, the compressed
   FVMAIN_COMPACT it decompresses, the page tables and temporary RAM it sets up, the PEI and
   DXE volumes it writes, and (SMM builds, ``tseg`` > 0) VariablePei's read of the flash
   variable store.
3. PlatformPei on the BSP: set-all (fixed all WB, variable zero, defType 0xC06) — its closing
   CD 1→0 is the BSP's first flip; set-attribute [0xA0000, +0x60000) UC (0x259 and
   0x268-0x26F); set-attribute of the 32-bit PCI hole UC (one pair at ``pci_hole``, or two for
   older OVMF). Then PEI moves to its permanent memory at the top of low RAM.
4. PEI MP init (CpuMpPei): the BSP clears the AP stacks and MP data and writes the wakeup
   buffer below 1 MiB. First INIT-SIPI wave: every AP, at CD=1 from reset, runs the wakeup
   code, reads the MP data and its stack top, then loads the BSP's CR0 (CD=0) and records
   itself with MTRRs still off — a burst the BSP, polling the MP data, is part of.
5. Second wave, the AP sync: every AP runs set-all with the BSP's table — a burst.
6. DXE: DXE IPL and the DXE core in memory below PEI's; CpuDxe's MP init repeats the AP sync
   (a burst) through a new wakeup buffer and stacks.
7. One DXE attribute change (the 64-bit PCI aperture, UC): set-attribute on the BSP, then
   set-all on every AP at once (a burst).
8. BDS: QemuVideoDxe clears 4 MiB of the std VGA's framebuffer (BAR0 at ``vram``, in the UC
   hole; a RAM memslot of QEMU's) and GOP paints it.
9. ExitBootServices parks the APs (one more wave, CD kept at 0).
10. Linux (:func:`linux_boot`), UEFI boot: no legacy table scans; efifb paints the framebuffer.

Addresses come from OVMF's X64 4 MiB build (:class:`OvmfLayout`); where an address is
inferred (the VGA BAR) or build-dependent it is a parameter. KVM also zaps everything when QEMU
deletes a memslot (flash writes, the guest sizing BARs); memslots are fixed here, so those zaps
are not replayed and a strategy cannot lean on them.

Zap events, N vCPUs, N-1 APs (a wrapper: Base1 counts its two defType writes, Base2 its two CD
flips; the range writes happen with E=0; inside a set-all the defType writes happen with CD=1):

======================================  ==============  ==============
events                                   Base1           Base2
======================================  ==============  ==============
reset pushes                             2N              0
BSP set-all (CD already 1)               2               1
BSP set-attribute x2 (VGA, PCI hole)     4               4
AP CR0 restore burst                     0               N-1
PEI AP sync burst                        2(N-1)          2(N-1)
DXE AP sync burst                        2(N-1)          2(N-1)
DXE aperture: BSP + AP burst             2 + 2(N-1)      2 + 2(N-1)
Linux (BSP init + ``cache_aps_init``)     2 + 2N          2 + 2N
total (N = 8)                            84              74
======================================  ==============  ==============
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.units import GIB, KIB, MIB
from mtrremu.workloads.building import (
    LOCAL_APIC,
    WB_BYTES,
    Handover,
    LinuxParams,
    TraceBuilder,
    linux_boot,
    mtrr_change,
    qemu_reset_push,
    var_mask,
)
from mtrremu.workloads.layouts import FOUR_GIB, low_ram_end, q35
from mtrremu.workloads.trace import Trace


@dataclass(frozen=True)
class OvmfLayout:
    """Where OVMF's X64 4 MiB build keeps what the boot touches (edk2-stable202305 era)."""

    #: SECFV at the top of the flash; SEC reads one header per 4 KiB page down to its start.
    secfv_size: int = 0x34000
    #: FVMAIN_COMPACT right below it; SEC reads its LZMA-compressed section.
    fvmain_compact: int = 0xFFC84000
    compressed_size: int = 2 * MIB
    #: The variable store at the bottom of the flash that VariablePei reads (SMM builds):
    #: variables, event log and fault-tolerant-write working block.
    varstore: int = 0xFFC00000
    varstore_read: int = 0x42000
    #: MEMFD: SEC's page tables, its temporary RAM, the PEI and DXE firmware volumes.
    page_tables: int = 0x800000
    page_tables_size: int = 0x6000
    temp_ram: int = 0x810000
    temp_ram_size: int = 0x10000
    pei_fv: int = 0x820000
    pei_fv_size: int = 0xE0000
    dxe_fv: int = 0x900000
    dxe_fv_size: int = 0xD00000
    #: PEI's permanent memory at the top of low RAM (below TSEG): page tables, AP stacks and
    #: about 64 MiB.
    pei_memory: int = 65 * MIB
    #: The PEI and DXE wakeup buffers (the highest free page below 640 KiB, then below
    #: 0x88000) and each AP's stack.
    pei_wakeup: int = 0x9F000
    dxe_wakeup: int = 0x87000
    ap_stack_size: int = 32 * KIB
    #: QemuVideoDxe's clear of the framebuffer on mode set.
    framebuffer_clear: int = 4 * MIB


@dataclass(frozen=True)
class Params:
    vcpus: int = 8
    ram: int = 16 * GIB
    #: CR0 the reset vector loads: 0x40000023 (mid-2023 tree, CD=1) or 0x23 (later, CD=0).
    ovmf_reset_cr0: int = 0x40000023
    #: The 32-bit PCI hole's UC pairs: "current" (0x80000000/2 GiB) or "older" (two pairs).
    pci_hole: str = "current"
    #: The DXE attribute change: a UC 64-bit PCI aperture (base, size).
    aperture_base: int = 0x800000000
    aperture_size: int = 32 * GIB
    #: Memory PEI touches in its permanent memory, and DXE below it.
    pei_touch: int = 16 * MIB
    dxe_touch: int = 128 * MIB
    #: SMRAM at the top of low RAM (OVMF with SMM).
    tseg: int = 16 * MIB
    #: Where OVMF's PCI bus driver puts the std VGA's 16 MiB BAR0: bottom-up from the 32-bit
    #: aperture's base, largest first (inferred from the allocator).
    vram: int = 0x80000000
    ovmf: OvmfLayout = field(default_factory=OvmfLayout)
    #: GOP's mode is 1280x800 at 32 bpp.
    linux: LinuxParams = field(default_factory=lambda: LinuxParams(framebuffer_bytes=4000 * KIB))


def set_all(b: TraceBuilder, vcpu: int, table: dict[int, int]) -> list[VcpuOp]:
    """``MtrrSetAllMtrrs``: every fixed and variable MSR, changed or not."""
    writes = [(msr, table[msr]) for msr in (*msrs.FIXED_MSRS, *msrs.VAR_MSRS)]
    return _change(b, vcpu, writes, table[msrs.DEFTYPE])


def set_attribute(b: TraceBuilder, vcpu: int, table: dict[int, int]) -> list[VcpuOp]:
    """``MtrrSetMemoryAttribute``: only the MSRs whose value changes."""
    writes = [
        (msr, table[msr])
        for msr in (*msrs.FIXED_MSRS, *msrs.VAR_MSRS)
        if b.mtrrs[vcpu][msr] != table[msr]
    ]
    return _change(b, vcpu, writes, table[msrs.DEFTYPE])


def _change(
    b: TraceBuilder, vcpu: int, writes: list[tuple[int, int]], deftype: int
) -> list[VcpuOp]:
    """MtrrLib's wrapper around an MTRR change: ``MtrrLibPreMtrrChange`` clears only E (FE and
    the default type stay), then ``MtrrLibPostMtrrChange`` (or ``MtrrSetAllMtrrs``) writes
    ``deftype`` [edk2 UefiCpuPkg/Library/MtrrLib/MtrrLib.c, edk2-stable202305]."""
    return mtrr_change(b, vcpu, writes, deftype, clear=msrs.DEFTYPE_E)


def _pairs(table: dict[int, int], ranges: list[tuple[int, int]], maxphyaddr: int) -> None:
    """Put UC ``(base, size)`` ranges in the first free variable pairs of ``table``."""
    pair = next(p for p in range(msrs.VAR_PAIRS) if not table[msrs.PHYSBASE0 + 2 * p + 1])
    for base, size in ranges:
        table[msrs.PHYSBASE0 + 2 * pair] = base
        table[msrs.PHYSBASE0 + 2 * pair + 1] = var_mask(size, maxphyaddr)
        pair += 1


@dataclass(frozen=True)
class _Mp:
    """One MP-services instance (CpuMpPei, then CpuDxe): its wakeup buffer, its code and data
    (``CPU_MP_DATA``, exchange info) and its AP stacks."""

    wakeup: int
    data: int
    stacks: int
    stack_size: int

    def stack_top(self, ap: int) -> int:
        return self.stacks + (ap + 1) * self.stack_size - 0x1000

    def prepare(self, b: TraceBuilder, vcpus: int) -> None:
        """The BSP clears the buffer and writes the wakeup code before any AP runs."""
        b.touch(0, self.stacks, vcpus * self.stack_size)
        b.add(b.pages(0, self.data, self.wakeup))

    def funnel(self, b: TraceBuilder, ap: int) -> list[VcpuOp]:
        """An AP from INIT-SIPI to its C code: the wakeup page, the code and page tables the
        exchange info points to, the MP data, its stack top, the local APIC."""
        return [
            b.init(ap),
            *b.pages(ap, self.wakeup, self.data, self.stack_top(ap), LOCAL_APIC),
        ]

    def wave(self, b: TraceBuilder, aps: list[int], work: Callable[[int], list[VcpuOp]]) -> None:
        """One broadcast INIT-SIPI: every AP runs the funnel, then ``work(ap)``, then checks in,
        all at once, while the BSP polls the MP data."""
        lanes = {ap: [*self.funnel(b, ap), *work(ap), *b.pages(ap, self.data)] for ap in aps}
        if lanes:
            lanes[0] = b.pages(0, self.data) * max(len(ops) for ops in lanes.values())
        b.burst(lanes)


def _sync(b: TraceBuilder, ap: int, table: dict[int, int], mp: _Mp) -> list[VcpuOp]:
    """``ApInitializeSync`` / ``SetMtrrsFromBuffer``: set-all with the BSP's table, read from
    the MP data inside the wrapper (CD=1)."""
    ops = set_all(b, ap, table)
    return [*ops[:1], *b.pages(ap, mp.data), *ops[1:]]


def build(params: Params, seed: int = 1) -> Trace:
    layout = params.ovmf
    slots = q35(params.ram, flash=4 * MIB, tseg=params.tseg, vram=params.vram)
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=slots)
    low_top = low_ram_end(slots)
    b = TraceBuilder(config, seed)
    maxphy = config.guest_maxphyaddr
    qemu_reset_push(b)
    qemu_reset_push(b)
    bsp, aps = 0, [ap for ap in b.vcpus if ap]
    # SEC and early PEI, before PlatformPei sets the MTRRs.
    b.add(b.pages(bsp, FOUR_GIB - 0x1000))
    b.add([b.write_cr0(bsp, params.ovmf_reset_cr0)])
    b.touch(bsp, FOUR_GIB - layout.secfv_size, layout.secfv_size)
    b.touch(bsp, layout.page_tables, layout.page_tables_size)
    b.touch(bsp, layout.temp_ram, layout.temp_ram_size)
    b.touch(bsp, layout.fvmain_compact, layout.compressed_size)
    b.touch(bsp, layout.pei_fv, layout.pei_fv_size)
    b.touch(bsp, layout.dxe_fv, layout.dxe_fv_size)
    if params.tseg:
        b.touch(bsp, layout.varstore, layout.varstore_read)
    # PlatformPei on the BSP: set-all, then two attribute changes.
    table = {msr: 0 for msr in msrs.MTRR_MSRS}
    table.update({msr: WB_BYTES for msr in msrs.FIXED_MSRS})
    table[msrs.DEFTYPE] = 0xC06
    b.add(set_all(b, bsp, table))
    table[msrs.FIX16K_A0000] = 0
    table.update({msr: 0 for msr in msrs.FIXED_MSRS[3:]})
    b.add(set_attribute(b, bsp, table))
    hole = (
        [(0x80000000, 2 * GIB)]
        if params.pci_hole == "current"
        else [(0xB0000000, 256 * MIB), (0xC0000000, GIB)]
    )
    _pairs(table, hole, maxphy)
    b.add(set_attribute(b, bsp, table))
    # Permanent PEI memory; PEI MP init: CR0 restore, then the MTRR sync, each a wave.
    pei_base = low_top - layout.pei_memory
    b.touch(bsp, low_top - params.pei_touch, params.pei_touch)
    stacks = len(b.vcpus) * layout.ap_stack_size
    pei_mp = _Mp(layout.pei_wakeup, low_top - 0x200000, pei_base, layout.ap_stack_size)
    pei_mp.prepare(b, len(b.vcpus))
    pei_mp.wave(
        b, aps, lambda ap: [b.write_cr0(ap, b.cr0[bsp]), *b.pages(ap, pei_mp.stack_top(ap))]
    )
    pei_mp.wave(b, aps, lambda ap: _sync(b, ap, table, pei_mp))
    # DXE: the DXE core and drivers below PEI's memory; CpuDxe's MP init and AP sync.
    dxe_top = pei_base - stacks
    b.touch(bsp, dxe_top - params.dxe_touch, params.dxe_touch)
    dxe_mp = _Mp(layout.dxe_wakeup, dxe_top - 0x100000, dxe_top, layout.ap_stack_size)
    dxe_mp.prepare(b, len(b.vcpus))
    dxe_mp.wave(b, aps, lambda ap: _sync(b, ap, table, dxe_mp))
    # PciHostBridgeDxe: the 64-bit aperture UC, on the BSP, then every AP.
    _pairs(table, [(params.aperture_base, params.aperture_size)], maxphy)
    b.add(set_attribute(b, bsp, table))
    dxe_mp.wave(b, aps, lambda ap: _sync(b, ap, table, dxe_mp))
    # BDS: the framebuffer cleared and painted; ExitBootServices parks the APs.
    b.touch(bsp, params.vram, layout.framebuffer_clear)
    dxe_mp.wave(b, aps, lambda ap: b.pages(ap, dxe_top - 0x200000))
    linux_boot(b, params.linux, Handover(efi=True, vram=params.vram))
    return b.trace("W2", params)
