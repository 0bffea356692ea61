"""Every cell of the seed patch's two tables (patch 10: the CD-toggle zap when MTRRs are honoured).

Each case programs one vCPU's MTRRs, faults all memory in, flips CR0.CD with a guest write and
checks the zap decision — nothing, the listed non-default ranges, or everything — both in what
was requested and in what is left in the EPT. The same events under ``zap-all`` zap everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mtrremu.core import msrs
from mtrremu.core.events import EventResult
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import ZAP_ALL, GfnRange
from mtrremu.core.vm import Vm
from tests.helpers import (
    CD0,
    CD1,
    GIB,
    MIB,
    gfn,
    gpa,
    leaves,
    make_vm,
    q35_slots,
    set_deftype,
    set_fixed_all,
    set_var,
)

FIXED_AREA = GfnRange(0, gfn(MIB))
UC_HOLE = GfnRange(gfn(3 * GIB), gfn(4 * GIB))
WT_RANGE = GfnRange(gfn(5 * GIB), gfn(5 * GIB + 512 * MIB))
NOTHING: tuple[GfnRange, ...] = ()
EVERYTHING = (ZAP_ALL,)


@dataclass(frozen=True)
class Cell:
    """One cell: the MTRR setup, the guest's CPUID and quirk, the toggle direction."""

    quirk: bool
    mtrrs: str  # "enabled-wb", "enabled-wb-fixed-wb", "enabled-uc", "disabled"
    feature_mtrr: bool
    to_cd: int  # the CD value the guest writes

    @property
    def id(self) -> str:
        quirk = "quirk-on" if self.quirk else "quirk-off"
        feature = "" if self.feature_mtrr else "-no-feature-mtrr"
        return f"{quirk}-{self.mtrrs}{feature}-cd{1 - self.to_cd}to{self.to_cd}"


def program(vm: Vm, cell: Cell) -> None:
    """Host-initiated MTRR setup on vCPU 0 (host writes at CD=1 never zap)."""
    fixed_type = MemType.WB if cell.mtrrs == "enabled-wb-fixed-wb" else MemType.UC
    set_fixed_all(vm, 0, MemType.WB)
    if fixed_type is not MemType.WB:
        assert vm.write_msr(0, msrs.FIX16K_A0000, 0, host=True).gp is None
    set_var(vm, 0, 0, 0, 8 * GIB, MemType.WB)
    set_var(vm, 0, 1, 3 * GIB, GIB, MemType.UC)
    set_var(vm, 0, 2, 5 * GIB, 512 * MIB, MemType.WT)
    deftype = {
        "enabled-wb": 0xC06,
        "enabled-wb-fixed-wb": 0xC06,
        "enabled-uc": 0xC00,
        "disabled": 0x006,
    }[cell.mtrrs]
    set_deftype(vm, 0, deftype)


def expected_ranges(cell: Cell) -> tuple[GfnRange, ...]:
    if not cell.quirk:
        return EVERYTHING  # CD=1 is UC+IPAT: never the MTRR type
    if cell.mtrrs == "disabled":
        return EVERYTHING if cell.feature_mtrr else NOTHING
    if cell.mtrrs == "enabled-uc":
        return EVERYTHING
    # Default WB == the CD=1 type: only ranges of another type, the fixed area first, then
    # the variable ranges in KVM's list order (descending base: WT at 5 GiB, then UC at 3 GiB).
    var = (WT_RANGE, UC_HOLE)
    return var if cell.mtrrs == "enabled-wb-fixed-wb" else (FIXED_AREA, *var)


CELLS = [
    Cell(quirk, mtrrs, feature, to_cd)
    for quirk in (True, False)
    for mtrrs, feature in (
        ("enabled-wb", True),
        ("enabled-wb-fixed-wb", True),
        ("enabled-uc", True),
        ("disabled", True),
        ("disabled", False),
    )
    for to_cd in (0, 1)
]


def toggle(strategy: str, cell: Cell) -> tuple[Vm, EventResult, list[tuple[int, int, int]]]:
    """Set up the cell, fault every page in, flip CD with a guest write; return the VM, the
    flip's result and the leaves that were present before the flip."""
    vm = make_vm(
        strategy,
        quirk_cd_nw_cleared=cell.quirk,
        feature_mtrr=cell.feature_mtrr,
        memslots=q35_slots(8),
        guest_maxphyaddr=40,
    )
    program(vm, cell)
    start_cd = CD1 if cell.to_cd == 0 else CD0
    assert vm.write_cr0(0, start_cd, host=True).zap is None
    for slot in vm.config.memslots:
        vm.fault_range(0, gpa(slot.base_gfn), gpa(slot.end_gfn))
    before = leaves(vm)
    assert before
    result = vm.write_cr0(0, CD1 if cell.to_cd else CD0)
    assert result.cd_toggled and result.gp is None
    assert result.zap is not None and result.zap.zap_event
    assert result.counters.zap_events == 1
    return vm, result, before


def overlaps_any(leaf: tuple[int, int, int], ranges: tuple[GfnRange, ...]) -> bool:
    base, level, _ = leaf
    span = GfnRange(base, base + (1 << (9 * (level - 1))))
    return any(span.overlaps(rng) for rng in ranges)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_fine_grained_zaps_what_the_seed_table_says(cell: Cell) -> None:
    vm, result, before = toggle("fine-grained", cell)
    expected = expected_ranges(cell)
    zap = result.counters
    assert vm.zap_list.queued() == []  # the toggling vCPU drained everything it queued
    after = leaves(vm)
    if expected == EVERYTHING:
        assert after == []
    else:
        assert after == [leaf for leaf in before if not overlaps_any(leaf, expected)]
    if expected == NOTHING:
        # Counted as a zap event, yet nothing was queued and no list protocol ran.
        assert (zap.ranges_requested, zap.drains, zap.zaps_executed) == (0, 0, 0)
        assert after == before


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_fine_grained_requests_exactly_the_listed_ranges(cell: Cell) -> None:
    vm = make_vm(
        "fine-grained",
        quirk_cd_nw_cleared=cell.quirk,
        feature_mtrr=cell.feature_mtrr,
        memslots=q35_slots(8),
    )
    program(vm, cell)
    vm.write_cr0(0, CD1 if cell.to_cd == 0 else CD0, host=True)
    result = vm.write_cr0(0, CD1 if cell.to_cd else CD0)
    assert result.zap is not None
    assert tuple(result.zap.requested) == expected_ranges(cell)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_zap_all_zaps_everything_for_the_same_events(cell: Cell) -> None:
    vm, result, _ = toggle("zap-all", cell)
    assert result.zap is not None and tuple(result.zap.requested) == EVERYTHING
    assert leaves(vm) == []
    assert vm.store.leaf_total == 0
