"""W1: SeaBIOS → Linux on q35 [coreboot/seabios src/romlayout.S, src/fw/mtrr.c, src/fw/smp.c].

In order:

1. QEMU pushes the 28 MTRR MSRs (zero, host-initiated, defType first) on every vCPU, twice:
   after machine init and on the system reset that follows; CR0 is the reset value (CD=1).
2. The BSP enters 32-bit mode (``transition32``): CR0.CD/NW cleared by the guest.
3. POST touches low memory.
4. ``mtrr_setup`` on the BSP, no CD toggle (31 writes): defType ← 0; 0x250, 0x258 ← WB;
   0x259 ← UC; 0x268-0x26F ← WP; all 16 variable MSRs ← 0; pair 0 ← UC over
   [``pcimem_start``, 4 GiB); defType ← 0xC06.
5. INIT-SIPI to every AP: each AP clears CD on entry (``entry_smp`` goes through the same
   32-bit transition) before taking the SMP lock — a burst.
6. One AP at a time under the lock, each replays the same 31 writes.
7. Linux (:func:`linux_boot`).

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
from mtrremu.core.units import GIB, MIB
from mtrremu.workloads.building import (
    WB_BYTES,
    WP_BYTES,
    LinuxParams,
    TraceBuilder,
    linux_boot,
    qemu_reset_push,
    var_pairs,
)
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace

#: CR0 after ``transition32``: PE and ET; PG, CD and NW cleared.
SEABIOS_CR0 = 0x11


@dataclass(frozen=True)
class Params:
    vcpus: int = 8
    ram: int = 16 * GIB
    #: Start of the 32-bit PCI memory window SeaBIOS covers with a UC pair (q35: 3 GiB).
    pcimem_start: int = 0xC0000000
    #: Low memory POST touches (from 0, skipping the VGA hole) and RAM from 1 MiB.
    post_touch: int = 8 * MIB
    #: Order APs take the SMP lock: "ascending" or "seeded".
    ap_order: str = "ascending"
    linux: LinuxParams = field(default_factory=LinuxParams)


def mtrr_setup(b: TraceBuilder, vcpu: int, pcimem_start: int) -> list[VcpuOp]:
    """SeaBIOS ``mtrr_setup``: the 31 writes, in order."""
    size = (1 << 32) - pcimem_start
    ops: list[VcpuOp] = [b.wrmsr(vcpu, msrs.DEFTYPE, 0)]
    fixed = {msrs.FIX64K_00000: WB_BYTES, msrs.FIX16K_80000: WB_BYTES, msrs.FIX16K_A0000: 0}
    ops += [b.wrmsr(vcpu, msr, fixed.get(msr, WP_BYTES)) for msr in msrs.FIXED_MSRS]
    ops += [b.wrmsr(vcpu, msr, 0) for msr in msrs.VAR_MSRS]
    ops += var_pairs(b, vcpu, [(pcimem_start, size)])
    ops.append(b.wrmsr(vcpu, msrs.DEFTYPE, 0xC06))
    return ops


def build(params: Params, seed: int = 1) -> Trace:
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=q35(params.ram))
    b = TraceBuilder(config, seed)
    qemu_reset_push(b)
    qemu_reset_push(b)
    b.add([b.write_cr0(0, SEABIOS_CR0)])
    b.touch(0, 0, 0xA0000)
    b.touch(0, 0xC0000, 0x40000)
    b.touch(0, MIB, params.post_touch)
    b.add(mtrr_setup(b, 0, params.pcimem_start))
    aps = [ap for ap in b.vcpus if ap]
    b.burst({ap: [b.init(ap), b.write_cr0(ap, SEABIOS_CR0)] for ap in aps})
    if params.ap_order == "seeded":
        b.shuffle(aps)
    for ap in aps:
        b.add(mtrr_setup(b, ap, params.pcimem_start))
    linux_boot(b, params.linux)
    return b.trace("W1", params)
