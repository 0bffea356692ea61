"""A small SeaBIOS-like boot, run under several strategies: the CLI's ``demo``.

QEMU pushes zeroed MTRRs twice while CR0.CD=1; the BSP clears CD and programs the MTRRs (a UC
PCI hole); the APs clear CD together (a burst) and replay the writes one at a time; then every
CPU runs Linux's ``cache_cpu_init`` (CD set, MTRRs off and on, CD cleared) and the guest
touches its RAM.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtrremu.core import msrs
from mtrremu.core.burst import run_burst
from mtrremu.core.config import GIB, Memslot, VmConfig
from mtrremu.core.counters import Counters
from mtrremu.core.events import Burst, Op, WriteCr0, WriteMsr
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import default_manager

DEMO_STRATEGIES = ("kvm-6.5", "zap-all", "zap-all-serialized", "fine-grained", "fine-grained-split")
_CD0 = 0x11
_CD1 = 0x40000011
_PCI_HOLE_MASK = (~(GIB - 1) & ((1 << 40) - 1)) | msrs.PHYSMASK_VALID


def _config(vcpus: int) -> VmConfig:
    return VmConfig(
        vcpus=vcpus,
        noncoherent_dma=1,
        memslots=(
            Memslot.from_bytes(0, 0xA0000, name="low"),
            Memslot.from_bytes(1 << 20, 2 * GIB - (1 << 20), name="below-4g"),
            Memslot.from_bytes(4 * GIB, 2 * GIB, name="above-4g"),
        ),
    )


def _seabios_mtrr_writes(vcpu: int) -> list[Op]:
    fixed = {msrs.FIX64K_00000: 0x0606060606060606, msrs.FIX16K_80000: 0x0606060606060606}
    ops: list[Op] = [WriteMsr(vcpu, msrs.DEFTYPE, 0)]
    for msr in msrs.FIXED_MSRS:
        ops.append(WriteMsr(vcpu, msr, fixed.get(msr, 0x0505050505050505 if msr >= 0x268 else 0)))
    ops += [WriteMsr(vcpu, msr, 0) for msr in msrs.VAR_MSRS]
    ops += [
        WriteMsr(vcpu, msrs.PHYSBASE0, 0xC0000000),
        WriteMsr(vcpu, msrs.PHYSBASE0 + 1, _PCI_HOLE_MASK),
        WriteMsr(vcpu, msrs.DEFTYPE, 0xC06),
    ]
    return ops


def boot(vm: Vm, seed: int) -> None:
    """Replay the demo boot on ``vm``."""
    vcpus = range(len(vm.vcpus))
    for _ in range(2):  # QEMU's two reset pushes
        for vcpu in vcpus:
            for msr in msrs.MTRR_MSRS:
                vm.write_msr(vcpu, msr, 0, host=True)
    vm.write_cr0(0, _CD0)
    for op in _seabios_mtrr_writes(0):
        vm.apply(op)
    run_burst(vm, Burst(tuple((ap, (WriteCr0(ap, _CD0),)) for ap in vcpus if ap), seed))
    for ap in vcpus:
        if ap:
            for op in _seabios_mtrr_writes(ap):
                vm.apply(op)
    vm.fault_range(0, 0, 0x4000)
    for vcpu in vcpus:  # Linux cache_cpu_init on every CPU, one at a time
        vm.write_cr0(vcpu, _CD1)
        vm.write_msr(vcpu, msrs.DEFTYPE, 0)
        vm.write_msr(vcpu, msrs.DEFTYPE, 0xC06)
        vm.write_cr0(vcpu, _CD0)
    for slot in vm.config.memslots:
        vm.fault_range(0, slot.base_gfn, slot.end_gfn)


def run_demo(
    names: Sequence[str], vcpus: int = 4, seed: int = 1
) -> list[tuple[str, Counters, int]]:
    """``(strategy, counters, stale leaves at quiescence)`` for each strategy."""
    rows = []
    for name in names:
        vm = default_manager().create_vm(_config(vcpus), name)
        boot(vm, seed)
        report = vm.stale_at_quiescence()
        rows.append((name, vm.counters_snapshot(), report.count if report else -1))
    return rows
