"""The strategy's own behaviour, through a VM built by mtrremu's plugin manager."""

from __future__ import annotations

from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.units import GIB, PAGE_SHIFT
from mtrremu.plugin.manager import PluginManager
from mtrremu.testing.cases import CD0, set_deftype, var_mask

MEMORY = (Memslot.from_bytes(0, 4 * GIB),)


def test_it_is_installed_from_this_distribution() -> None:
    names = {s.name: s for s in PluginManager().strategies()}
    assert names["example-changed"].distribution == "mtrremu-example-changed"


def test_a_uc_range_zaps_exactly_its_gigabyte() -> None:
    vm = PluginManager().create_vm(VmConfig(noncoherent_dma=1, memslots=MEMORY), "example-changed")
    set_deftype(vm, 0, 0xC06)  # WB default
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, 4 * GIB)
    assert vm.write_msr(0, msrs.PHYSBASE0, 3 * GIB).gp is None  # UC; V=0 still: no change
    result = vm.write_msr(0, msrs.PHYSBASE0 + 1, var_mask(GIB))
    assert result.zap is not None
    zapped = [(r.start << PAGE_SHIFT, r.end << PAGE_SHIFT) for r in result.zap.requested]
    assert zapped == [(3 * GIB, 4 * GIB)]
    assert vm.stale(0).clean


def test_dma_attach_zaps_the_memslots_not_the_whole_gfn_space() -> None:
    vm = PluginManager().create_vm(VmConfig(memslots=MEMORY), "example-changed")
    vm.fault_range(0, 0, GIB)
    result = vm.attach_dma()
    assert result.zap is not None
    assert [(r.start, r.end) for r in result.zap.requested] == [(0, (4 * GIB) >> PAGE_SHIFT)]
    assert vm.stale(0).clean
