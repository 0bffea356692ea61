"""Every cell of the seed patch's two tables (patch 10: the CD-toggle zap when MTRRs are honoured).

Each case programs one vCPU's MTRRs, faults all memory in, flips CR0.CD with a guest write and
checks the zap decision — nothing, the listed non-default ranges, or everything — both in what
was requested and in what is left in the EPT (the cells live in :mod:`mtrremu.testing.cases`,
shared with the conformance suite). The same events under ``zap-all`` zap everything.
"""

from __future__ import annotations

import pytest

from mtrremu.core.events import EventResult
from mtrremu.core.units import GfnRange
from mtrremu.core.vm import Vm
from mtrremu.testing.cases import (
    CELLS,
    EVERYTHING,
    NOTHING,
    Cell,
    expected_ranges,
    program,
)
from tests.helpers import CD0, CD1, gpa, leaves, make_vm, q35_slots


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
