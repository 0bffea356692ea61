"""W7: the passthrough device unplugged and plugged back in a running guest [qemu hw/vfio/pci.c
``vfio_realize``/``vfio_instance_finalize`` → hw/vfio/common.c ``vfio_kvm_device_add_group`` /
``_del_group``; linux virt/kvm/vfio.c ``kvm_vfio_update_coherency``].

KVM honours guest MTRRs only while a non-coherent DMA device is attached. A running guest's
only such device (a GPU or an assigned device behind an IOMMU without snoop control) is removed
with ``device_del`` — QEMU drops its VFIO group from KVM, the count goes 1→0 — and later added
back with ``device_add`` (0→1). Each transition makes every leaf's type change (WB with IPAT
while no such device is attached; the MTRR type otherwise), so KVM zaps everything on both.
(QEMU's virtio-net "failover" unplug before live migration keeps the group, and the count,
unchanged: it is not this event.)

In order: the VMM restores a booted q35 guest as QEMU does (as W4: CR0 first, CD=0, then the
MTRRs, defType first, so every MTRR write lands with MTRRs enabled);
every vCPU touches its working set and the BSP the framebuffer (std VGA BAR0, UC under the
MTRRs); ``unplug`` detaches the device; the guest runs on; ``replug`` attaches it again; the
guest runs on.

Zap events, N vCPUs: the restore's 28 MTRR writes on each vCPU, 28N, under every rule set
(CD=0 and E=1 from the first write on). The two transitions are DMA zap events (counted
apart), one each under every rule set.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrremu.core.config import VmConfig
from mtrremu.core.events import AttachDma, DetachDma
from mtrremu.core.units import GIB, MIB
from mtrremu.workloads.building import TraceBuilder
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace
from mtrremu.workloads.w4_large import booted_table, ram_shares, restore_running


@dataclass(frozen=True)
class Params:
    vcpus: int = 8
    ram: int = 16 * GIB
    #: Where the firmware put the std VGA's BAR0, and how much of it fbcon keeps painting.
    vram: int = 0xFD000000
    framebuffer_bytes: int = 3 * MIB
    #: Share of RAM the guest keeps touching, split over its vCPUs.
    working_set: float = 0.25
    #: Detach the device, and attach it again afterwards.
    unplug: bool = True
    replug: bool = True


def build(params: Params, seed: int = 1) -> Trace:
    config = VmConfig(
        vcpus=params.vcpus, noncoherent_dma=1, memslots=q35(params.ram, vram=params.vram)
    )
    b = TraceBuilder(config, seed)
    restore_running(b, booted_table(config.guest_maxphyaddr))

    def run() -> None:
        for vcpu, start, size in ram_shares(b, params.working_set):
            b.touch(vcpu, start, size)
        b.touch(0, params.vram, params.framebuffer_bytes)

    run()
    if params.unplug:
        b.add([DetachDma()])
        run()
        if params.replug:
            b.add([AttachDma()])
            run()
    return b.trace("W7", params)
