"""W6: hvmloader-style serial MTRR programming [xen-project/xen
tools/firmware/hvmloader/cacheattr.c, smp.c].

No disable around the writes: the boot CPU, then each AP strictly one at a time, writes the
fixed ranges (WB, 0x259 WC), UC pairs over the PCI hole split into aligned powers of two, and
defType ← 0xC06. Under Xen the domain builder starts the BSP with CD=0 (here: a host CR0
write); APs enter protected mode with ``lmsw``, which does not touch CD. Variants:

* ``kvm``: APs keep CD=1 from reset, so under Base2 their MTRR writes do not zap; Linux's
  trampoline clears their CD later;
* ``cd0``: a synthetic variant with the APs at CD=0 too — the case where vCPUs disagree with
  caches on.

Then Linux (:func:`linux_boot`). Zap events, N vCPUs, P PCI-hole pairs: with E=0 the range
writes are no events, so each CPU's programming is 1 event (its defType write) — Base1 N;
Base2 1 (BSP) + N-1 (``cd0``) or 1 (``kvm``, plus N-1 CD flips at Linux's entry). Linux adds
2 + 2N under either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import GIB, MIB
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
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace


@dataclass(frozen=True)
class Params:
    vcpus: int = 4
    ram: int = 8 * GIB
    #: "kvm" (APs at CD=1) or "cd0" (APs at CD=0).
    variant: str = "kvm"
    #: Start of the PCI hole hvmloader covers with UC pairs (up to 4 GiB).
    pci_hole_start: int = 0xD0000000
    hvmloader_touch: int = 4 * MIB
    linux: LinuxParams = field(default_factory=LinuxParams)


def program(b: TraceBuilder, vcpu: int, hole: int) -> list[VcpuOp]:
    """``cacheattr.c``: fixed ranges, UC pairs over the hole, then defType."""
    fixed = {msr: WB_BYTES for msr in msrs.FIXED_MSRS}
    fixed[msrs.FIX16K_A0000] = fixed_value(MemType.WC)
    ops: list[VcpuOp] = [b.wrmsr(vcpu, msr, value) for msr, value in fixed.items()]
    ops += var_pairs(b, vcpu, power_of_two_ranges(hole, 1 << 32))
    ops.append(b.wrmsr(vcpu, msrs.DEFTYPE, 0xC06))
    return ops


def build(params: Params, seed: int = 1) -> Trace:
    if params.variant not in ("kvm", "cd0"):
        raise ValueError(f"unknown variant {params.variant!r}")
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=q35(params.ram))
    b = TraceBuilder(config, seed)
    for vcpu in b.vcpus:
        if vcpu == 0 or params.variant == "cd0":
            b.add([b.write_cr0(vcpu, cr0.PE | cr0.ET, host=True)])
    b.touch(0, MIB, params.hvmloader_touch)
    for vcpu in b.vcpus:
        b.add(program(b, vcpu, params.pci_hole_start))
    # hvmloader's ROMBIOS/SeaBIOS boots Linux the BIOS way, tables in the F-segment.
    linux_boot(b, params.linux, Handover(efi=False))
    return b.trace("W6", params)
