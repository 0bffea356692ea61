"""The EPT store (docs/semantics.md#events-and-zaps): leaves at three levels, zaps, visited
entries, refaults.

Counts are checked against hand-computed walks of the 4-level tree (512 entries a table).
"""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrremu.core import msrs
from mtrremu.core.config import Memslot
from mtrremu.core.ept import LEAF, MMIO, ZAPPED, EptStore, encode_leaf
from mtrremu.core.memtype import WB_IPAT, WB_NO_IPAT
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import EPT_GFN_LIMIT, ZAP_ALL, GfnRange, Level
from mtrremu.core.vm import MMIO_TABLES_MIN, Vm, mmio_table_budget
from tests.helpers import GIB, MIB, MemslotKind, gfn, gpa, leaves, make_vm, set_deftype, set_var

WB = encode_leaf(WB_NO_IPAT)


def test_lookup_of_an_empty_store_ends_at_the_root() -> None:
    entry = EptStore().lookup(0x12345)
    assert (entry.level, entry.present, entry.zapped) == (Level.ROOT, False, False)


@pytest.mark.parametrize("level", [Level.K4, Level.M2, Level.G1])
def test_install_creates_the_path_and_a_leaf_covering_the_aligned_region(level: Level) -> None:
    store = EptStore()
    target = 0x40000 + 0x1234
    assert store.install(target, level, WB) is False
    base = (target >> level.shift) << level.shift
    for probe in (base, base + level.pages - 1, target):
        entry = store.lookup(probe)
        assert (entry.level, entry.base_gfn, entry.byte) == (level, base, WB)
    assert not store.lookup(base + level.pages).present
    assert store.leaf_counts()[level] == 1
    tables = store.table_counts()
    assert tables[Level.ROOT] == 1
    assert tables[Level.G1] == 1
    assert tables[Level.M2] == (1 if level <= Level.M2 else 0)
    assert tables[Level.K4] == (1 if level is Level.K4 else 0)


def test_zap_cuts_a_2m_leaf_whole_when_the_range_covers_one_page_of_it() -> None:
    store = EptStore()
    store.install(0x200, Level.M2, WB)  # 2 MiB leaf at gfn 0x200
    outcome = store.zap(GfnRange(0x3FF, 0x400))  # its last page only
    assert outcome.removed == {Level.G1: 0, Level.M2: 1, Level.K4: 0}
    assert not store.lookup(0x200).present
    assert store.lookup(0x250).zapped


def test_visited_counts_entries_of_present_tables_overlapping_the_range() -> None:
    store = EptStore()
    for page in range(0, 512 * 3):  # three full 4K tables under one PD
        store.install(page, Level.K4, WB)
    outcome = store.zap(GfnRange(100, 700))
    # root: 1 entry; PDPT: 1 entry; PD: entries 0 and 1 overlap; PT0: 100..511, PT1: 0..187.
    assert outcome.visited == {
        Level.ROOT: 1,
        Level.G1: 1,
        Level.M2: 2,
        Level.K4: (512 - 100) + (700 - 512),
    }
    assert outcome.removed[Level.K4] == 600


def test_zap_all_visits_512_root_entries_and_every_present_table() -> None:
    store = EptStore()
    store.install(0, Level.K4, WB)
    store.install(gfn(5 * GIB), Level.M2, WB)
    store.install(gfn(600 * GIB), Level.G1, WB)  # a second PDPT table
    outcome = store.zap(ZAP_ALL)
    assert outcome.visited == {
        Level.ROOT: 512,
        Level.G1: 2 * 512,
        Level.M2: 2 * 512,
        Level.K4: 512,
    }
    assert outcome.leaves_removed == 3


def test_tables_stay_after_a_zap_so_the_next_walk_visits_them_again() -> None:
    store = EptStore()
    store.install(0, Level.K4, WB)
    first = store.zap(ZAP_ALL)
    second = store.zap(ZAP_ALL)
    assert first.leaves_removed == 1 and second.leaves_removed == 0
    assert second.visited == first.visited
    assert store.table_counts()[Level.K4] == 1


@pytest.mark.parametrize(
    "rng", [GfnRange(10, 10), GfnRange(20, 10), GfnRange(EPT_GFN_LIMIT, EPT_GFN_LIMIT + 5)]
)
def test_empty_inverted_or_out_of_space_ranges_zap_nothing_and_visit_nothing(
    rng: GfnRange,
) -> None:
    store = EptStore()
    store.install(10, Level.K4, WB)
    outcome = store.zap(rng)
    assert outcome.leaves_removed == 0 and outcome.entries_visited == 0
    assert store.lookup(10).present


def test_a_zapped_huge_leaf_passes_its_refault_mark_to_new_smaller_tables() -> None:
    store = EptStore()
    store.install(0x200, Level.M2, WB)
    store.zap(GfnRange(0x200, 0x201))
    assert store.install(0x234, Level.K4, WB) is True  # refault
    assert store.lookup(0x235).zapped  # the rest of the old span still remembers
    assert store.install(0x235, Level.K4, WB) is True
    assert store.install(0x400, Level.K4, WB) is False  # never mapped before


def test_a_huge_fault_over_a_present_table_replaces_it_and_its_leaves() -> None:
    store = EptStore()
    for page in (0x200, 0x201, 0x3FF):
        store.install(page, Level.K4, WB)
    assert store.leaf_counts()[Level.K4] == 3
    store.install(0x250, Level.M2, encode_leaf(WB_IPAT))
    assert store.leaf_counts() == {Level.G1: 0, Level.M2: 1, Level.K4: 0}
    assert store.table_counts()[Level.K4] == 0
    entry = store.lookup(0x201)
    assert (entry.level, entry.memtype) == (Level.M2, WB_IPAT)


def test_mmio_markers_are_not_leaves_and_zaps_leave_them() -> None:
    vm = make_vm("zap-all", memslots=(Memslot.from_bytes(0, 64 * MIB),))
    result = vm.access(0, 3 * GIB)
    assert result.access is not None and result.access.kind.value == "mmio"
    entry = vm.lookup(3 * GIB)
    assert entry.mmio and entry.mapping is None and not entry.zapped
    assert vm.store.leaf_total == 0
    zap = vm.store.zap(ZAP_ALL)
    assert zap.leaves_removed == 0
    assert vm.lookup(3 * GIB).mmio
    assert vm.stale(0).count == 0


def test_refault_is_counted_on_the_vm_after_a_zap() -> None:
    vm = make_vm("zap-all", max_mapping_level=Level.K4)
    vm.write_cr0(0, 0x11, host=True)
    assert vm.access(0, 0x5000).counters.refaults == 0
    set_deftype(vm, 0, 0xC06)  # CD=0, MTRR write: zap all
    result = vm.access(0, 0x5000)
    assert result.access is not None and result.access.refault
    assert vm.counters.refaults == 1 and vm.counters.faults == 2


def test_leaf_bytes_encode_type_and_ipat() -> None:
    assert encode_leaf(WB_NO_IPAT) == LEAF | MemType.WB
    assert encode_leaf(WB_IPAT) == LEAF | 0x08 | MemType.WB
    assert LEAF & ZAPPED == 0 and LEAF & MMIO == 0


def test_bulk_fault_counts_faults_hits_and_pages_outside_memslots() -> None:
    vm = make_vm(
        "zap-all", memslots=(Memslot.from_bytes(0, 4 * MIB), Memslot.from_bytes(8 * MIB, 2 * MIB))
    )
    result = vm.fault_range(0, 0, 16 * MIB)
    assert result.populate is not None
    # E=0: consistent everywhere; 2M leaves: [0,2M), [2M,4M), [8M,10M).
    assert result.populate.outcome.installed == {Level.G1: 0, Level.M2: 3, Level.K4: 0}
    assert result.populate.hits == gfn(6 * MIB) - 3
    assert result.populate.outside_memslots == gfn(10 * MIB)


# -- bulk faults equal sequential single accesses ---------------------------------------


def _random_vm_pair(seed: int) -> tuple[Vm, Vm]:
    rng = random.Random(seed)
    slots = (
        Memslot.from_bytes(0, 640 * 1024),
        Memslot.from_bytes(MIB, 62 * MIB),
        Memslot.from_bytes(64 * MIB, 4 * MIB, MemslotKind.DEVICE),
        Memslot.from_bytes(GIB, GIB),
    )
    level = rng.choice([Level.K4, Level.M2, Level.G1])
    pair: list[Vm] = []
    for _ in range(2):
        vm = make_vm("zap-all", memslots=slots, max_mapping_level=level)
        r = random.Random(seed)
        set_deftype(vm, 0, r.choice([0, 0xC06, 0x806, 0xC00, 0x800]))
        for msr in msrs.FIXED_MSRS:
            if r.random() < 0.3:
                raw = bytes(r.choice([0, 1, 4, 5, 6]) for _ in range(8))
                vm.write_msr(0, msr, int.from_bytes(raw, "little"), host=True)
        for p in range(8):
            if r.random() < 0.4:
                size = 1 << r.randint(12, 31)
                base = r.randrange(0, 1 << 32, 1 << 12) & ~(size - 1)
                set_var(vm, 0, p, base, size, r.choice([0, 1, 4, 5, 6]))
        if r.random() < 0.5:
            vm.write_cr0(0, 0x11)
        pair.append(vm)
    return pair[0], pair[1]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), touches=st.lists(st.integers(0, gfn(2 * GIB)), max_size=6))
def test_bulk_fault_equals_touching_each_page_in_order(seed: int, touches: list[int]) -> None:
    bulk, single = _random_vm_pair(seed)
    for page in touches:
        bulk.access(0, gpa(page))
        single.access(0, gpa(page))
    rng = random.Random(seed)
    lo = rng.randrange(0, gfn(2 * GIB))
    hi = min(lo + rng.randrange(1, 40_000), gfn(2 * GIB) + 1)
    result = bulk.fault_range(0, gpa(lo), gpa(hi))
    faults = refaults = 0
    for page in range(lo, hi):
        if single.memslots.index_of(page) < 0:
            continue
        one = single.access(0, gpa(page))
        faults += one.counters.faults
        refaults += one.counters.refaults
    assert leaves(bulk) == leaves(single)
    assert (result.counters.faults, result.counters.refaults) == (faults, refaults)


def test_store_bytes_per_4k_leaf_stay_near_one() -> None:
    vm = make_vm("zap-all", max_mapping_level=Level.K4, memslots=(Memslot.from_bytes(0, GIB),))
    vm.fault_range(0, 0, GIB)
    store = vm.store
    assert store.leaf_counts()[Level.K4] == gfn(GIB)
    assert store.nbytes / store.leaf_total < 2
    assert np.all(np.array(list(store.table_counts().values())) > 0)


def test_leaf_runs_of_a_store_whose_tables_hold_no_leaves_are_empty() -> None:
    store = EptStore()
    store.install(5, Level.K4, WB)
    store.zap(ZAP_ALL)  # the tables stay, the leaf is gone
    assert list(store.leaf_runs()) == []
    store.install(7, Level.K4, WB)
    store.install(8, Level.K4, WB)
    assert list(store.leaf_runs()) == [(Level.K4, 7, 2, WB)]


def test_mmio_markers_stop_making_tables_at_the_vms_budget() -> None:
    vm = make_vm("zap-all", memslots=(Memslot.from_bytes(0, 4096),))
    budget = mmio_table_budget(vm.config)
    assert budget == MMIO_TABLES_MIN  # 4 KiB of RAM: the floor
    before = sum(vm.store.table_counts().values())
    exits = [vm.access(0, (i + 1) * 2 * MIB).counters.mmio_exits for i in range(5 * budget)]
    assert exits == [1] * (5 * budget)  # every access is an MMIO exit, marker or not
    made = sum(vm.store.table_counts().values()) - before
    assert made == vm.store.mmio_tables <= budget
    assert vm.lookup(2 * MIB).mmio  # the first markers were left...
    assert not vm.lookup(5 * budget * 2 * MIB).mmio  # ...the last ones could not be


def reference_runs(store: EptStore) -> list[tuple[Level, int, int, int]]:
    """Runs computed the plain way, from every leaf at once."""
    leaves_ = sorted(
        (int(g), int(level), int(b))
        for level, gfns, bytes_ in store.leaves()
        for g, b in zip(gfns, bytes_, strict=True)
    )
    runs: list[list[int]] = []
    for gfn_, level, byte in leaves_:
        last = runs[-1] if runs else None
        if (
            last
            and (last[0], last[3]) == (level, byte)
            and last[1] + last[2] * Level(level).pages == gfn_
        ):
            last[2] += 1
        else:
            runs.append([level, gfn_, 1, byte])
    return [(Level(r[0]), r[1], r[2], r[3]) for r in runs]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([Level.K4, Level.M2, Level.G1]), st.integers(0, 4 << 18)),
        max_size=60,
    ),
    st.sampled_from([WB, encode_leaf(WB_IPAT)]),
)
def test_leaf_runs_built_region_by_region_match_the_plain_computation(
    installs: list[tuple[Level, int]], byte: int
) -> None:
    store = EptStore()
    for index, (level, gfn_) in enumerate(installs):
        if not store.lookup(gfn_).present:  # a fault never lands under a present leaf
            store.install(gfn_, level, byte if index % 3 else WB)
    assert list(store.leaf_runs()) == reference_runs(store)


def test_dumping_leaf_runs_holds_one_region_not_the_whole_ept() -> None:
    vm = make_vm("zap-all", memslots=(Memslot.from_bytes(0, 16 * GIB),), max_mapping_level=Level.K4)
    set_deftype(vm, 0, 0xC06)
    vm.fault_range(0, 0, 16 * GIB)  # 4 Mi leaves of 4 KiB
    assert vm.store.leaf_total == 4 << 20
    tracemalloc.start()
    try:
        runs = list(vm.leaf_runs())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(runs) < 100 and sum(count for _, _, count, _ in runs) == 4 << 20
    # One 1 GiB region is 256 Ki leaves; the whole EPT would be 16 times that.
    assert peak < 40 << 20, f"{peak >> 20} MiB"


def _fresh_copy(store: EptStore) -> EptStore:
    """The same EPT, with none of ``store``'s remembered walks."""
    return EptStore.from_image(store.image(), store.mmio_table_budget)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("install"),
                st.sampled_from([Level.K4, Level.M2, Level.G1]),
                st.integers(0, 1 << 22),
            ),
            st.tuples(st.just("zap"), st.integers(0, 1 << 22), st.integers(1, 1 << 22)),
            st.tuples(st.just("zap-all"), st.just(0), st.just(0)),
            st.tuples(st.just("again"), st.just(0), st.just(0)),
        ),
        max_size=40,
    )
)
def test_a_zap_counts_what_a_walk_of_a_fresh_copy_counts(steps: list[tuple[object, ...]]) -> None:
    """Prediction: the store answers a repeated zap of an unchanged EPT, and a zap of the whole
    space, without walking; each must give exactly the counts a walk of an identical store that
    remembers nothing gives (and leave the same EPT behind)."""
    store, last = EptStore(), ZAP_ALL
    for kind, first, second in steps:
        if kind == "install":
            level, gfn_ = first, second
            assert isinstance(level, Level) and isinstance(gfn_, int)
            if not store.lookup(gfn_).present:
                store.install(gfn_, level, WB)
            continue
        if kind == "zap":
            assert isinstance(first, int) and isinstance(second, int)
            last = GfnRange(first, first + second)
        elif kind == "zap-all":
            last = ZAP_ALL
        copy = _fresh_copy(store)
        # [0, the last gfn) walks: with nothing mapped near the top of the space it visits and
        # removes what a zap of everything does.
        want = copy.zap(GfnRange(0, EPT_GFN_LIMIT - 1) if last == ZAP_ALL else last)
        got = store.zap(last)
        assert (got.removed, got.visited) == (want.removed, want.visited)
        assert store.image().same_as(copy.image())
