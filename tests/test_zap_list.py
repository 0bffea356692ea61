"""Patch 9's zap list (docs/semantics.md#the-zap-list): order, duplicate drop, draining,
allocation failures."""

from __future__ import annotations

from mtrremu.core import msrs
from mtrremu.core.counters import Counters
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import ZAP_ALL, GfnRange
from mtrremu.core.zap_list import Role, ZapList
from tests.helpers import (
    CD0,
    CD1,
    GIB,
    MIB,
    leaves,
    make_vm,
    q35_slots,
    set_deftype,
    set_var,
)


def recording_list() -> tuple[ZapList, list[GfnRange]]:
    zapped: list[GfnRange] = []

    def zap(rng: GfnRange, counters: Counters) -> None:
        zapped.append(rng)
        counters.zaps_executed += 1

    return ZapList(zap), zapped


def test_ranges_are_kept_length_ascending_then_start_descending() -> None:
    zap_list, _ = recording_list()
    counters = Counters()
    for rng in (
        GfnRange(0, 100),
        GfnRange(500, 510),
        GfnRange(100, 110),
        GfnRange(0, 10),
        GfnRange(50, 150),
        GfnRange(900, 901),
    ):
        zap_list.add(rng, counters)
    assert zap_list.queued() == [
        GfnRange(900, 901),
        GfnRange(500, 510),
        GfnRange(100, 110),
        GfnRange(0, 10),
        GfnRange(50, 150),
        GfnRange(0, 100),
    ]
    assert counters.ranges_queued == 6


def test_only_identical_ranges_are_dropped() -> None:
    zap_list, _ = recording_list()
    counters = Counters()
    first = zap_list.add(GfnRange(0, 100), counters)
    assert zap_list.add(GfnRange(0, 100), counters) is first
    zap_list.add(GfnRange(10, 20), counters)  # contained: kept
    zap_list.add(GfnRange(50, 150), counters)  # overlapping, same length: kept
    assert (counters.ranges_queued, counters.duplicates_dropped) == (3, 1)
    assert len(zap_list.queued()) == 3


def test_a_wrapped_range_sorts_as_the_longest() -> None:
    zap_list, _ = recording_list()
    counters = Counters()
    zap_list.add(GfnRange(10, 0), counters)  # u64 length 2**64 - 10
    zap_list.add(ZAP_ALL, counters)
    assert zap_list.queued() == [ZAP_ALL, GfnRange(10, 0)]


def test_drain_zaps_smallest_first_and_marks_tickets() -> None:
    zap_list, zapped = recording_list()
    counters = Counters()
    tickets = [zap_list.add(r, counters) for r in (ZAP_ALL, GfnRange(0, 256), GfnRange(5, 6))]
    assert zap_list.drain_or_wait(counters) is Role.DRAINED
    assert zapped == [GfnRange(5, 6), GfnRange(0, 256), ZAP_ALL]
    assert all(t.drained for t in tickets)
    assert (counters.drains, counters.zaps_executed) == (1, 3)
    assert zap_list.queued() == []


def test_a_claimed_list_makes_others_wait() -> None:
    zap_list, _ = recording_list()
    assert zap_list.try_claim()
    assert not zap_list.try_claim()


# -- allocation failures through a VM ----------------------------------------------------


def test_fine_grained_allocation_failure_clears_the_list_and_zaps_all() -> None:
    vm = make_vm("fine-grained")
    set_var(vm, 0, 0, 3 * GIB, GIB, MemType.UC)
    set_var(vm, 0, 1, 2 * GIB, 256 * MIB, MemType.WT)
    set_deftype(vm, 0, 0xC06)
    vm.fault_range(0, 0, 4 * GIB)
    # Another vCPU's range is waiting on the list.
    other = vm.zap_list.add(GfnRange(7, 8), Counters())
    vm.zap_list.fail_allocations(count=1, after=1)  # the second range fails
    result = vm.write_cr0(0, CD0)
    assert result.zap is not None and result.zap.alloc_failed
    assert result.zap.role is None  # no drain, no wait: zapped directly
    assert other.discarded and not other.drained
    assert vm.zap_list.queued() == []
    assert leaves(vm) == []
    assert (result.counters.alloc_failures, result.counters.zaps_executed) == (1, 1)


def test_serialised_allocation_failure_zaps_the_request_directly() -> None:
    vm = make_vm("zap-all-serialized")
    vm.write_cr0(0, CD0, host=True)
    vm.fault_range(0, 0, GIB)
    other = vm.zap_list.add(GfnRange(7, 8), Counters())
    vm.zap_list.fail_allocations()
    result = vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    assert result.zap is not None and result.zap.alloc_failed and result.zap.role is None
    assert leaves(vm) == []
    assert vm.zap_list.queued() == [other.range]  # patch 9 leaves others' ranges queued
    assert result.counters.zaps_executed == 1


def test_split_allocation_failure_keeps_parts_already_queued() -> None:
    vm = make_vm("fine-grained-split", memslots=q35_slots(8))
    vm.write_cr0(0, CD0, host=True)
    vm.zap_list.fail_allocations(after=1)  # the second memslot part fails
    result = vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    assert result.zap is not None and result.zap.alloc_failed
    assert vm.zap_list.queued() == [q35_slots(8)[0].gfns]
    assert result.counters.zaps_executed == 1  # the whole request, directly
    # The next drainer picks the leftover part up, with its own range (the fixed area: the
    # fixed MSRs were never written, so they are UC, not the WB default).
    drained = vm.write_cr0(0, CD1)
    assert drained.counters.zaps_executed == 2
    assert vm.zap_list.queued() == []
