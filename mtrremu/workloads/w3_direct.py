"""W3: direct kernel boot [firecracker src/vmm/src/arch/x86_64 regs.rs, msr.rs, layout.rs,
src/vmm/src/builder.rs; cloud-hypervisor hypervisor/src/kvm/x86_64; crosvm x86_64/src/regs.rs,
bzimage.rs; linux arch/x86/kernel/head_64.S, arch/x86/boot/compressed/head_64.S].

No firmware: the VMM sets up every vCPU with host writes — the MSRs (defType ← 0x806: MTRRs on,
default WB; crosvm also UC pairs covering [``pci_start``, 4 GiB)) and CR0 — then Linux runs.
``boot_protocol``:

* ``linux`` (default): the VMM only adds PE/PG to the reset CR0, so every vCPU enters the
  kernel with CD=1; Linux's 64-bit entry clears CD: one guest CD 1→0 per vCPU (the BSP at
  entry, each AP in the trampoline after INIT);
* ``pvh``: CR0 = PE|ET, CD=0 from the start.

What the BSP touches with CD=1 before that entry depends on ``kernel_format``:

* ``elf`` (default): an uncompressed vmlinux, what Firecracker loads on x86_64 (its builder
  uses linux-loader's ``Elf`` loader only). The VMM copies its segments to their physical
  addresses and enters ``startup_64`` (``arch/x86/kernel/head_64.S``), which loads CR0 (CD=0)
  in ``secondary_startup_64`` after a few instructions: with CD=1 the BSP touches only the
  identity page tables the VMM built, which its page walks read until ``startup_64`` loads its
  own CR3 (PML4, PDPTE and PDE at 0x9000, 0xA000, 0xB000: Firecracker's ``regs.rs``), and the
  kernel image around its entry (modelled as the entry page: the stack and page tables
  ``startup_64`` fixes up sit in the image at build-dependent places);
* ``bzimage``: a compressed bzImage, which crosvm also loads (``bzimage.rs``) and enters at its
  64-bit entry, the decompressor's ``startup_64`` (``arch/x86/boot/compressed/head_64.S``),
  which writes no CR0: the decompressor copies and decompresses the kernel with CD=1
  (``decompress_touch`` bytes from 1 MiB) before the kernel's own entry clears CD. Only
  ``vmm=crosvm`` accepts it.

``msrs_first`` (default true) pushes the MSRs before setting CR0.

Zap events, N vCPUs (touches are no events, so ``kernel_format`` changes no count):

* the host MSR push: the defType write is one event per vCPU under Base1 (crosvm's pairs come
  before it, with E=0: none); under Base2 it is one only when CR0 already has CD=0 (``pvh``
  with ``msrs_first`` false);
* Linux's entry clearing CD (``linux`` protocol): N under Base2, none under Base1 (quirk on);
* Linux's BSP ``cache_cpu_init`` and ``cache_aps_init``: 2 + 2N under either.

So with the defaults (``linux``, MSRs first, N = 2): Base1 2 + 6 = 8, Base2 2 + 6 = 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.units import GIB, MIB
from mtrremu.workloads.building import (
    Handover,
    LinuxParams,
    TraceBuilder,
    linux_boot,
    power_of_two_ranges,
    var_pairs,
)
from mtrremu.workloads.layouts import direct
from mtrremu.workloads.trace import Trace

#: The VMM's identity page tables (PML4, PDPTE, PDE) the CPU walks while a vmlinux's
#: ``startup_64`` runs on them with CD=1 [firecracker regs.rs ``PML4_START`` ...].
BOOT_PAGES = (0x9000, 0xA000, 0xB000)


@dataclass(frozen=True)
class Params:
    vcpus: int = 2
    ram: int = 4 * GIB
    #: "firecracker", "cloud-hypervisor" or "crosvm" (crosvm adds UC pairs over the PCI hole).
    vmm: str = "firecracker"
    #: "linux" (enter with CD=1) or "pvh" (CR0 = PE|ET).
    boot_protocol: str = "linux"
    msrs_first: bool = True
    #: crosvm's 32-bit PCI window start.
    pci_start: int = 0xD0000000
    #: "elf" (an uncompressed vmlinux) or "bzimage" (crosvm only).
    kernel_format: str = "elf"
    #: Memory a bzImage's decompressor touches before Linux's entry clears CD.
    decompress_touch: int = 32 * MIB
    linux: LinuxParams = field(default_factory=LinuxParams)


def build(params: Params, seed: int = 1) -> Trace:
    if params.vmm not in ("firecracker", "cloud-hypervisor", "crosvm"):
        raise ValueError(f"unknown vmm {params.vmm!r}")
    if params.boot_protocol not in ("linux", "pvh"):
        raise ValueError(f"unknown boot_protocol {params.boot_protocol!r}")
    if params.kernel_format not in ("elf", "bzimage"):
        raise ValueError(f"unknown kernel_format {params.kernel_format!r}")
    if params.kernel_format == "bzimage" and params.vmm != "crosvm":
        raise ValueError(f"{params.vmm} loads no bzImage (kernel_format=bzimage: crosvm only)")
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=direct(params.ram))
    b = TraceBuilder(config, seed)
    boot_cr0 = (
        cr0.RESET_VALUE | cr0.PE | cr0.PG if params.boot_protocol == "linux" else cr0.PE | cr0.ET
    )
    for vcpu in b.vcpus:
        msr_ops: list[VcpuOp] = []
        if params.vmm == "crosvm":
            msr_ops += var_pairs(b, vcpu, power_of_two_ranges(params.pci_start, 1 << 32), host=True)
        msr_ops.append(b.wrmsr(vcpu, msrs.DEFTYPE, 0x806, host=True))
        cr0_op: list[VcpuOp] = [b.write_cr0(vcpu, boot_cr0, host=True)]
        b.add(msr_ops + cr0_op if params.msrs_first else cr0_op + msr_ops)
    if params.kernel_format == "bzimage":
        b.touch(0, MIB, params.decompress_touch)
    else:
        b.add(b.pages(0, *BOOT_PAGES, params.linux.kernel_base))
    # No firmware tables: the legacy scans find nothing and read their whole windows.
    linux_boot(b, params.linux, Handover(efi=False, rsdp=0xFFFF0))
    return b.trace("W3", params)
