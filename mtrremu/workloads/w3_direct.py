"""W3: direct kernel boot [firecracker src/vmm/src/arch/x86_64 regs.rs, msr.rs;
cloud-hypervisor hypervisor/src/kvm/x86_64; crosvm x86_64/src/regs.rs].

No firmware: the VMM sets up every vCPU with host writes — the MSRs (defType ← 0x806: MTRRs on,
default WB; crosvm also UC pairs covering [``pci_start``, 4 GiB)) and CR0 — then Linux runs.
``boot_protocol``:

* ``linux`` (default): the VMM only adds PE/PG to the reset CR0, so every vCPU enters the
  kernel with CD=1; the decompressor touches memory with CD=1; Linux's entry code clears CD: one
  guest CD 1→0 per vCPU (the BSP at entry, each AP in the trampoline after INIT);
* ``pvh``: CR0 = PE|ET, CD=0 from the start.

``msrs_first`` (default true) pushes the MSRs before setting CR0.

Zap events, N vCPUs:

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
    #: Memory the decompressor touches before Linux's entry clears CD.
    decompress_touch: int = 32 * MIB
    linux: LinuxParams = field(default_factory=LinuxParams)


def build(params: Params, seed: int = 1) -> Trace:
    if params.vmm not in ("firecracker", "cloud-hypervisor", "crosvm"):
        raise ValueError(f"unknown vmm {params.vmm!r}")
    if params.boot_protocol not in ("linux", "pvh"):
        raise ValueError(f"unknown boot_protocol {params.boot_protocol!r}")
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
    b.touch(0, MIB, params.decompress_touch)
    # No firmware tables: the legacy scans find nothing and read their whole windows.
    linux_boot(b, params.linux, Handover(efi=False, rsdp=0xFFFF0))
    return b.trace("W3", params)
