"""W6: hvmloader-style serial MTRR programming [xen-project/xen
tools/firmware/hvmloader/cacheattr.c ``cacheattr_init``, smp.c, pci.c ``pci_setup``, config.h;
xen/arch/x86/hvm/hvm.c ``hvm_vcpu_reset_state``; tools/libs/guest/xg_dom_x86.c].

No disable around the writes (``cacheattr_init``): the boot CPU, then each AP strictly one at
a time (``smp_initialise``), writes the fixed ranges (WB, 0x259 WC), UC pairs split into
aligned powers of two — first over the low PCI hole [``pci_hole_start``, ``pci_hole_end``),
then over the high one [``pci_hi_mem_start``, ``pci_hi_mem_end``), at most 8 pairs in all —
and defType ← 0xC06. ``pci_hole_end`` is ``pci_mem_end``, ``RESERVED_MEMBASE`` (0xFC000000),
not 4 GiB. The high hole exists when ``pci_setup`` relocates 64-bit BARs above RAM (always for
one over 1 GiB, ``BAR_RELOC_THRESH``): it starts at the first one, aligned to its size, above
the top of RAM (4 GiB at least) and ends where they end, rounded up to the start's alignment.

Under Xen every vCPU runs with CD=0: the domain builder starts the BSP with CR0 = PE|ET
(``xg_dom_x86.c``), and an AP comes out of INIT-SIPI with CR0 = ET (``hvm_vcpu_reset_state``;
hvmloader then sets PE with ``lmsw``, or, since 2024, starts it with ``VCPUOP_initialise`` and
CR0 = PE): host CR0 writes here. Variants:

* ``cd0`` (default): that, what hvmloader really does — vCPUs that disagree with caches on;
* ``kvm``: a hypothetical hvmloader on KVM, whose APs keep CD=1 from reset (0x60000010), so
  under Base2 their MTRR writes do not zap; Linux's trampoline clears their CD later.

Then Linux (:func:`linux_boot`). Zap events, N vCPUs: with E=0 the range writes are no events,
so each CPU's programming is 1 event (its defType write) — Base1 N; Base2 N (``cd0``), or 1
(BSP) plus N-1 CD flips at Linux's entry (``kvm``). Linux adds 2 + 2N under either. The number
of pairs changes no count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import GIB, MIB, PAGE_SHIFT
from mtrremu.workloads.building import (
    WB_BYTES,
    Handover,
    LinuxParams,
    TraceBuilder,
    fixed_value,
    linux_boot,
    power_of_two_ranges,
    var_pairs,
)
from mtrremu.workloads.layouts import FOUR_GIB, q35
from mtrremu.workloads.trace import Trace

#: ``pci_mem_end``'s value: ``RESERVED_MEMBASE``, where hvmloader's reserved area starts.
RESERVED_MEMBASE = 0xFC000000


@dataclass(frozen=True)
class Params:
    vcpus: int = 4
    ram: int = 8 * GIB
    #: "cd0" (Xen: every vCPU at CD=0) or "kvm" (hypothetical: APs at CD=1 from KVM's reset).
    variant: str = "cd0"
    #: ``pci_mem_start``: 0xF0000000 (``HVM_BELOW_4G_MMIO_START``), doubled down until the
    #: 32-bit BARs fit, or 4 GiB minus libxl's ``mmio_hole`` (here 768 MiB).
    pci_hole_start: int = 0xD0000000
    #: ``pci_mem_end``: ``RESERVED_MEMBASE`` (lower only with a Xen platform device BAR put
    #: at the hole's end).
    pci_hole_end: int = RESERVED_MEMBASE
    #: The 64-bit BARs ``pci_setup`` relocates above RAM, largest first, in bytes (a power of
    #: two: one BAR, or BARs that pack into one aligned block); 0 for none. Default: one 16 GiB
    #: BAR, over ``BAR_RELOC_THRESH``, so relocated whatever the low hole's room.
    high_bars: int = 16 * GIB
    hvmloader_touch: int = 4 * MIB
    linux: LinuxParams = field(default_factory=LinuxParams)


def high_hole(ram_top: int, bars: int) -> tuple[int, int]:
    """``[pci_hi_mem_start, pci_hi_mem_end)`` for ``bars`` bytes of 64-bit BARs placed above
    ``ram_top`` (``pci_setup``: the first BAR aligned to its size, the end rounded up to the
    start's alignment); ``(0, 0)`` for none."""
    if not bars:
        return 0, 0
    base = max(ram_top, FOUR_GIB)
    start = -(-base // bars) * bars
    end = ((start + bars - 1) | ((start & -start) - 1)) + 1
    return start, end


def uc_pairs(params: Params, ram_top: int) -> list[tuple[int, int]]:
    """The UC ``(base, size)`` pairs ``cacheattr_init`` writes: the low hole's blocks, then the
    high hole's, no more than the 8 pairs MTRRcap reports."""
    blocks = power_of_two_ranges(params.pci_hole_start, params.pci_hole_end)
    hi_start, hi_end = high_hole(ram_top, params.high_bars)
    if hi_end:
        blocks += power_of_two_ranges(hi_start, hi_end)
    return blocks[: msrs.VAR_PAIRS]


def program(b: TraceBuilder, vcpu: int, pairs: list[tuple[int, int]]) -> list[VcpuOp]:
    """``cacheattr_init``: fixed ranges, the UC pairs, then defType."""
    fixed = {msr: WB_BYTES for msr in msrs.FIXED_MSRS}
    fixed[msrs.FIX16K_A0000] = fixed_value(MemType.WC)
    ops: list[VcpuOp] = [b.wrmsr(vcpu, msr, value) for msr, value in fixed.items()]
    ops += var_pairs(b, vcpu, pairs)
    ops.append(b.wrmsr(vcpu, msrs.DEFTYPE, 0xC06))
    return ops


def build(params: Params, seed: int = 1) -> Trace:
    if params.variant not in ("kvm", "cd0"):
        raise ValueError(f"unknown variant {params.variant!r}")
    if params.high_bars & (params.high_bars - 1):
        raise ValueError(f"high_bars {params.high_bars:#x} is not a power of two")
    slots = q35(params.ram)
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=slots)
    b = TraceBuilder(config, seed)
    ram_top = max(s.end_gfn for s in slots if s.name.startswith("ram")) << PAGE_SHIFT
    for vcpu in b.vcpus:
        if vcpu == 0:
            b.add([b.write_cr0(vcpu, cr0.PE | cr0.ET, host=True)])
        elif params.variant == "cd0":
            b.add([b.write_cr0(vcpu, cr0.ET, host=True)])
    b.touch(0, MIB, params.hvmloader_touch)
    pairs = uc_pairs(params, ram_top)
    for vcpu in b.vcpus:
        b.add(program(b, vcpu, pairs))
    # hvmloader's ROMBIOS/SeaBIOS boots Linux the BIOS way, tables in the F-segment.
    linux_boot(b, params.linux, Handover(efi=False))
    return b.trace("W6", params)
