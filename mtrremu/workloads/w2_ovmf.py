"""W2: OVMF → Linux on q35 [tianocore/edk2 UefiCpuPkg/ResetVector/Vtf0,
UefiCpuPkg/Library/MtrrLib/MtrrLib.c, MpInitLib/MpLib.c, CpuDxe/CpuDxe.c,
OvmfPkg PlatformInitLib/MemDetect.c].

Every MTRR change is wrapped as: CR0.CD ← 1 · defType ← current with E and FE cleared ·
writes · defType ← new value (E set) · CR0.CD ← 0; setting CD when it is already 1 is no flip.
``MtrrSetAllMtrrs`` (set-all) writes all 11 fixed and 16 variable MSRs; ``MtrrSetMemoryAttribute``
(set-attribute) writes only those that change. In order:

1. QEMU's two reset pushes (as W1).
2. The reset vector loads ``ovmf_reset_cr0`` (default 0x40000023: CD=1, no flip; an older
   copy loads 0x23: a CD flip). SEC and early PEI touch memory with CD=1, MTRRs off.
3. BSP in PEI: set-all (fixed all WB, variable zero, defType 0xC06) — its closing CD 1→0 is
   the BSP's first flip; set-attribute [0xA0000, +0x60000) UC (0x259 and 0x268-0x26F);
   set-attribute of the 32-bit PCI hole UC (one pair at ``pci_hole``, or two for older OVMF).
4. PEI MP init: every AP, from reset (CD=1), loads the BSP's CR0 (CD=0) — a burst — then runs
   set-all with the BSP's table (the AP sync) — a burst.
5. DXE touches more memory; DXE MP init repeats the AP sync (a burst).
6. One DXE attribute change (the 64-bit PCI aperture, UC): set-attribute on the BSP, then
   set-all on every AP at once (a burst).
7. Linux (:func:`linux_boot`).

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

from dataclasses import dataclass, field

from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.units import GIB, MIB
from mtrremu.workloads.building import (
    WB_BYTES,
    LinuxParams,
    TraceBuilder,
    linux_boot,
    mtrr_change,
    qemu_reset_push,
    var_mask,
)
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace


@dataclass(frozen=True)
class Params:
    vcpus: int = 8
    ram: int = 16 * GIB
    #: CR0 the reset vector loads: 0x40000023 (current tree, CD=1) or 0x23 (older, CD=0).
    ovmf_reset_cr0: int = 0x40000023
    #: The 32-bit PCI hole's UC pairs: "current" (0x80000000/2 GiB) or "older" (two pairs).
    pci_hole: str = "current"
    #: The DXE attribute change: a UC 64-bit PCI aperture (base, size).
    aperture_base: int = 0x800000000
    aperture_size: int = 32 * GIB
    #: Memory SEC/PEI touches (decompression) and DXE touches, from 1 MiB.
    pei_touch: int = 64 * MIB
    dxe_touch: int = 128 * MIB
    #: SMRAM at the top of low RAM (OVMF with SMM).
    tseg: int = 16 * MIB
    linux: LinuxParams = field(default_factory=LinuxParams)


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
    """MtrrLib's wrapper around an MTRR change (``MtrrLibPreMtrrChange``/``PostMtrrChange``
    clear only E and FE, keeping the default type)."""
    return mtrr_change(b, vcpu, writes, deftype, keep_default_type=True)


def _pairs(table: dict[int, int], ranges: list[tuple[int, int]], maxphyaddr: int) -> None:
    """Put UC ``(base, size)`` ranges in the first free variable pairs of ``table``."""
    pair = next(p for p in range(msrs.VAR_PAIRS) if not table[msrs.PHYSBASE0 + 2 * p + 1])
    for base, size in ranges:
        table[msrs.PHYSBASE0 + 2 * pair] = base
        table[msrs.PHYSBASE0 + 2 * pair + 1] = var_mask(size, maxphyaddr)
        pair += 1


def build(params: Params, seed: int = 1) -> Trace:
    config = VmConfig(
        vcpus=params.vcpus,
        noncoherent_dma=1,
        memslots=q35(params.ram, flash=4 * MIB, tseg=params.tseg),
    )
    b = TraceBuilder(config, seed)
    maxphy = config.guest_maxphyaddr
    qemu_reset_push(b)
    qemu_reset_push(b)
    bsp, aps = 0, [ap for ap in b.vcpus if ap]
    b.add([b.write_cr0(bsp, params.ovmf_reset_cr0)])
    b.touch(bsp, 0, 0xA0000)
    b.touch(bsp, MIB, params.pei_touch)
    # PEI on the BSP: set-all, then two attribute changes.
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
    # PEI MP init: APs restore the BSP's CR0, then sync the MTRRs; both at once.
    b.burst({ap: [b.init(ap), b.write_cr0(ap, b.cr0[bsp])] for ap in aps})
    b.burst({ap: set_all(b, ap, table) for ap in aps})
    # DXE.
    b.touch(bsp, MIB + params.pei_touch, params.dxe_touch)
    b.burst({ap: set_all(b, ap, table) for ap in aps})
    _pairs(table, [(params.aperture_base, params.aperture_size)], maxphy)
    b.add(set_attribute(b, bsp, table))
    b.burst({ap: set_all(b, ap, table) for ap in aps})
    linux_boot(b, params.linux)
    return b.trace("W2", params)
