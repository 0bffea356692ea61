"""Huge-page level reduction (docs/semantics.md#huge-pages): MTRR edges, memslot edges, max
level, profiles."""

from __future__ import annotations

import pytest

from mtrremu.core.config import Memslot, MemslotKind
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import Level
from mtrremu.core.vm import Vm
from tests.helpers import (
    CD0,
    CD1,
    GIB,
    KIB,
    MIB,
    make_vm,
    mapping,
    set_deftype,
    set_fixed_all,
    set_var,
)


def level_at(vm: Vm, gpa: int) -> Level:
    return mapping(vm.access(0, gpa)).level


# -- memslot edges (MTRRs disabled: consistent everywhere) -----------------------------------


def test_a_leaf_never_crosses_a_memslot_edge() -> None:
    vm = make_vm(
        "zap-all",
        memslots=(Memslot.from_bytes(0, 640 * KIB), Memslot.from_bytes(MIB, 2 * GIB - MIB)),
    )
    assert level_at(vm, 0) is Level.K4  # [0, 2M) holds a hole at 640K
    assert level_at(vm, MIB) is Level.K4  # [0, 2M) straddles the slot start
    assert level_at(vm, 2 * MIB) is Level.M2  # [0, 1G) is not inside one slot
    assert level_at(vm, GIB + 5 * MIB) is Level.G1  # [1G, 2G) is


def test_abutting_slots_split_the_huge_region_between_them() -> None:
    vm = make_vm(
        "zap-all",
        memslots=(Memslot.from_bytes(0, 3 * GIB // 2), Memslot.from_bytes(3 * GIB // 2, GIB)),
    )
    assert level_at(vm, 0) is Level.G1
    assert level_at(vm, GIB) is Level.M2  # [1G, 2G) spans both slots
    assert level_at(vm, 2 * GIB - 2 * MIB) is Level.M2


def test_a_device_slot_next_to_ram_gets_its_own_leaves() -> None:
    vm = make_vm(
        "zap-all",
        memslots=(
            Memslot.from_bytes(0, GIB + 4 * MIB),
            Memslot.from_bytes(GIB + 4 * MIB, 4 * MIB, MemslotKind.DEVICE),
        ),
    )
    device = mapping(vm.access(0, GIB + 4 * MIB))
    assert device.level is Level.M2
    assert device.memtype.type is MemType.UC
    assert level_at(vm, GIB) is Level.M2
    assert level_at(vm, 0) is Level.G1


@pytest.mark.parametrize(("limit", "expected"), [(Level.M2, Level.M2), (Level.K4, Level.K4)])
def test_the_max_mapping_level_caps_every_leaf(limit: Level, expected: Level) -> None:
    vm = make_vm("zap-all", max_mapping_level=limit)
    assert level_at(vm, GIB) is expected


# -- MTRR edges --------------------------------------------------------------------------


def enabled_wb(strategy: str = "zap-all", **config: object) -> Vm:
    vm = make_vm(strategy, **config)
    set_fixed_all(vm, 0, MemType.WB)
    set_deftype(vm, 0, 0xC06)
    vm.write_cr0(0, CD0, host=True)
    return vm


def test_a_small_uc_range_reduces_only_the_regions_it_touches() -> None:
    vm = enabled_wb()
    set_var(vm, 0, 0, 3 * GIB, 2 * MIB, MemType.UC)
    assert level_at(vm, 3 * GIB) is Level.M2  # [3G, 3G+2M) is wholly UC
    assert level_at(vm, 3 * GIB + 2 * MIB) is Level.M2  # partly covered 1G region: 2M
    assert level_at(vm, 2 * GIB) is Level.G1  # untouched 1G region


def test_a_4k_range_forces_4k_leaves_in_its_2m_region() -> None:
    vm = enabled_wb()
    set_var(vm, 0, 0, 3 * GIB + 8 * KIB, 4 * KIB, MemType.UC)
    assert level_at(vm, 3 * GIB) is Level.K4
    uc = mapping(vm.access(0, 3 * GIB + 8 * KIB))
    assert (uc.level, uc.memtype.type) == (Level.K4, MemType.UC)
    assert level_at(vm, 3 * GIB + 2 * MIB) is Level.M2


def test_overlapping_types_reduce_even_where_the_result_is_uniform() -> None:
    # WB over everything and UC over [3G, 4G): KVM's loop says WB inside the UC range (the UC
    # pair comes first), but the consistency test sees two types and maps 4 KiB pages.
    vm = enabled_wb(guest_maxphyaddr=40)
    set_var(vm, 0, 0, 0, 32 * GIB, MemType.WB)
    set_var(vm, 0, 1, 3 * GIB, GIB, MemType.UC)
    leaf = mapping(vm.access(0, 3 * GIB + 4 * MIB))
    assert (leaf.level, leaf.memtype.type) == (Level.K4, MemType.WB)


def test_fixed_ranges_are_walked_for_the_first_2m_region() -> None:
    # All 88 fixed ranges WB, then no variable range: "partial", but the one type seen is the
    # default, so even [0, 1G) is consistent.
    vm = enabled_wb(memslots=(Memslot.from_bytes(0, 4 * GIB),))
    assert level_at(vm, 0) is Level.G1
    vm2 = enabled_wb(memslots=(Memslot.from_bytes(0, 4 * GIB),))
    vm2.write_msr(0, 0x259, 0, host=True)  # VGA area UC: two types in [0, 2M) and [0, 1G)
    assert level_at(vm2, 0) is Level.K4
    assert level_at(vm2, 2 * MIB) is Level.M2


def test_reduction_applies_while_cd_is_set() -> None:
    vm = enabled_wb()
    set_var(vm, 0, 0, 3 * GIB, 2 * MIB, MemType.UC)
    vm.write_cr0(0, CD1, host=True)
    leaf = mapping(vm.access(0, 3 * GIB + 2 * MIB))
    assert leaf.level is Level.M2
    assert leaf.memtype.type is MemType.WB  # CD=1 under the quirk


@pytest.mark.parametrize(("strategy", "dma"), [("zap-all", 0), ("kvm-6.11", 1)])
def test_no_reduction_when_mtrrs_are_not_honoured(strategy: str, dma: int) -> None:
    vm = enabled_wb(strategy, noncoherent_dma=dma)
    set_var(vm, 0, 0, 3 * GIB + 8 * KIB, 4 * KIB, MemType.UC)
    assert level_at(vm, 3 * GIB) is Level.G1
