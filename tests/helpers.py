"""Shared test helpers: VMs built through the real plugin manager, MTRR programming shortcuts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from mtrremu.core import cr0, msrs
from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.units import Level
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
ALL_STRATEGIES = (
    "kvm-6.5",
    "kvm-6.7",
    "kvm-6.11",
    "zap-all",
    "zap-all-serialized",
    "fine-grained",
    "fine-grained-split",
)
SERIES = ("zap-all", "zap-all-serialized", "fine-grained", "fine-grained-split")
CD0 = cr0.ET | cr0.PE
CD1 = cr0.ET | cr0.PE | cr0.CD

_MANAGER = PluginManager(entry_points=False)


def make_vm(strategy: str = "fine-grained", **config: object) -> Vm:
    """A VM with one non-coherent DMA device attached at creation unless told otherwise."""
    config.setdefault("noncoherent_dma", 1)
    return _MANAGER.create_vm(VmConfig(**config), strategy)  # type: ignore[arg-type]


def q35_slots(ram_gib: int = 4) -> tuple[Memslot, ...]:
    """QEMU q35-like layout: RAM below 640 KiB, [1 MiB, 2 GiB), the rest above 4 GiB."""
    low = min(ram_gib, 2) * GIB
    slots = [Memslot.from_bytes(0, 640 * KIB, name="low"), Memslot.from_bytes(MIB, low - MIB)]
    if ram_gib > 2:
        slots.append(Memslot.from_bytes(4 * GIB, (ram_gib - 2) * GIB, name="high"))
    return tuple(slots)


def var_mask(size: int, maxphyaddr: int = 40) -> int:
    """A valid PhysMask value for a power-of-two ``size``."""
    return (~(size - 1) & ((1 << maxphyaddr) - 1) & ~0xFFF) | msrs.PHYSMASK_VALID


def set_var(
    vm: Vm, vcpu: int, pair: int, base: int, size: int, mtype: int, host: bool = True
) -> None:
    """Program a variable pair: base (with type) then mask, as firmware does."""
    maxphy = vm.config.guest_maxphyaddr
    assert vm.write_msr(vcpu, msrs.PHYSBASE0 + 2 * pair, base | mtype, host=host).gp is None
    assert (
        vm.write_msr(vcpu, msrs.PHYSBASE0 + 2 * pair + 1, var_mask(size, maxphy), host=host).gp
        is None
    )


def set_fixed_all(vm: Vm, vcpu: int, mtype: int, host: bool = True) -> None:
    value = int.from_bytes(bytes([mtype] * 8), "little")
    for msr in msrs.FIXED_MSRS:
        assert vm.write_msr(vcpu, msr, value, host=host).gp is None


def set_deftype(vm: Vm, vcpu: int, value: int, host: bool = True) -> None:
    assert vm.write_msr(vcpu, msrs.DEFTYPE, value, host=host).gp is None


def leaves(vm: Vm) -> list[tuple[int, int, int]]:
    """Every present leaf as ``(base gfn, level, byte)``, sorted."""
    return sorted(
        (int(g), int(level), int(b))
        for level, gfns, bytes_ in vm.store.leaves()
        for g, b in zip(gfns, bytes_, strict=True)
    )


def gfn(gpa: int) -> int:
    return gpa >> 12


__all__ = [
    "ALL_STRATEGIES",
    "CD0",
    "CD1",
    "GIB",
    "KIB",
    "MIB",
    "SERIES",
    "Level",
    "MemslotKind",
    "gfn",
    "leaves",
    "make_vm",
    "q35_slots",
    "set_deftype",
    "set_fixed_all",
    "set_var",
    "var_mask",
]


ROOT = Path(__file__).resolve().parents[1]


def run_command(
    *command: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a real subprocess from the repository root, capturing its text output; the caller
    checks the exit status."""
    return subprocess.run(
        list(command),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def run_mtrremu(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``mtrremu ARGS`` through this interpreter."""
    return run_command(sys.executable, "-m", "mtrremu.cli", *args, timeout=timeout)
