"""The quiescent oracle looks only where something changed; it must find what a full scan
finds. Every check here is cross-checked (``full_scan_every = 1``: a disagreement raises),
on every workload under every built-in strategy, and on random sequences in
``tests/test_stateful.py``; these tests also pin that the incremental checks look at far less
than the whole EPT (counted, not timed)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from mtrremu.ab.runner import RunSpec, trace_for
from mtrremu.core import msrs
from mtrremu.core import vm as vm_module
from mtrremu.core.burst import execute
from mtrremu.core.config import Memslot
from mtrremu.core.ept import EptStore
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.oracle import newly_stale, stale_keys, stale_keys_near
from mtrremu.core.units import GIB, Level
from mtrremu.workloads import WORKLOADS
from tests.helpers import ALL_STRATEGIES, CD0, CD1, MIB, create_vm, make_vm, var_mask

Keys = npt.NDArray[np.int64]
Spans = list[tuple[Keys, Keys]]
SMALL = {"W4": (("vcpus", 8), ("ram", 8 * GIB))}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_every_check_of_every_workload_agrees_with_a_full_scan(
    workload: str, strategy: str
) -> None:
    trace = trace_for(RunSpec(workload, strategy, overrides=SMALL.get(workload, ())))
    vm = create_vm(trace.config, strategy)
    vm.full_scan_every = 1
    execute(vm, trace.items)
    assert vm.staleness.checks > 0


def test_a_check_after_a_small_change_looks_at_a_small_part_of_the_ept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = make_vm(
        "fine-grained",
        memslots=(Memslot.from_bytes(0, 16 * GIB),),
        max_mapping_level=Level.K4,
        track_staleness=True,
    )
    vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, 16 * GIB)  # 4 Mi leaves; the first check scans them all
    full_scans: list[int] = []
    looked: list[int] = []

    def counted_near(store: EptStore, expected: IntervalMap, spans: Spans) -> Keys:
        looked.append(sum(int((ends - starts).sum()) for starts, ends in spans))
        return stale_keys_near(store, expected, spans)

    def counted_full(store: EptStore, expected: IntervalMap) -> Keys:
        full_scans.append(store.leaf_total)
        return stale_keys(store, expected)

    monkeypatch.setattr(vm_module, "stale_keys_near", counted_near)
    monkeypatch.setattr(vm_module, "stale_keys", counted_full)
    vm.write_cr0(0, CD1)
    vm.write_cr0(0, CD0)  # a check: it looks where the 4 Mi leaves were installed
    vm.access(0, 3 * GIB)  # one refault (the CD flips zapped everything)
    vm.write_cr0(0, CD1)
    vm.write_cr0(0, CD0)  # a check: the refault's page, nothing else changed
    vm.write_msr(0, msrs.PHYSBASE0, 0x40000000 | 1)  # WC at 1 GiB ...
    vm.write_msr(0, msrs.PHYSBASE0 + 1, var_mask(2 * MIB))  # ... for 2 MiB: a check
    assert vm.staleness.checks >= 4 and not full_scans
    # The first check looks where the bulk fault installed 4 Mi leaves; every later one (CD
    # flips, the refault, the pair) at a few hundred pages at most, of an EPT of 4 Mi leaves.
    assert looked[0] >= 16 * GIB >> 12
    assert len(looked) >= 4 and max(looked[1:]) <= 2 * MIB >> 12, looked


def test_vcpus_that_read_back_the_same_mtrrs_are_quiescent() -> None:
    """One vCPU wrote a PhysMask of 0, the other never wrote it: KVM stores them differently,
    but they read back alike and expect the same types."""
    vm = make_vm(vcpus=2, track_staleness=True)
    vm.write_msr(0, msrs.PHYSBASE0 + 1, 0, host=True)
    assert vm.vcpus[0].mtrr.masks != vm.vcpus[1].mtrr.masks
    assert vm.quiescent()


def test_a_write_that_changes_no_register_changes_no_check() -> None:
    """Rewriting what a vCPU already holds changes no type: the strategy is still asked (KVM
    zaps on every accepted write) but no event check and no quiescent check follow."""
    vm = make_vm("kvm-6.5", vcpus=2, noncoherent_dma=1, track_staleness=True)
    for vcpu in (0, 1):
        vm.write_cr0(vcpu, CD0)  # types follow the MTRRs
        vm.write_msr(vcpu, msrs.DEFTYPE, 0xC06)
    log = vm.staleness
    checks, event_checks, zaps = log.checks, log.event_checks, vm.counters.zap_events
    version = vm.vcpus[0].mtrr.version
    for vcpu in (0, 1):
        vm.write_msr(vcpu, msrs.DEFTYPE, 0xC06)
    assert vm.vcpus[0].mtrr.version == version
    assert (log.checks, log.event_checks) == (checks, event_checks)
    assert vm.counters.zap_events == zaps + 2
    vm.write_msr(0, msrs.DEFTYPE, 0x806)
    vm.write_msr(1, msrs.DEFTYPE, 0x806)
    assert (log.checks, log.event_checks) == (checks + 1, event_checks + 2)


def test_rewriting_a_pair_that_shares_its_base_reorders_and_counts_as_a_change() -> None:
    """KVM takes a rewritten valid pair out of its list and inserts it again before the first
    pair whose base is not above its own: the same value can move it ahead of a pair with the
    same base, and the order decides overlapping types (precedence=kvm)."""
    vm = make_vm(vcpus=1, track_staleness=True)
    for pair, size in ((0, 256 * MIB), (1, 512 * MIB)):
        vm.write_msr(0, msrs.PHYSBASE0 + 2 * pair, 0x6)
        vm.write_msr(0, msrs.PHYSBASE0 + 2 * pair + 1, var_mask(size))
    mtrr = vm.vcpus[0].mtrr
    assert mtrr.order == [1, 0]
    version = mtrr.version
    vm.write_msr(0, msrs.PHYSBASE0 + 1, var_mask(256 * MIB))
    assert mtrr.order == [0, 1]
    assert mtrr.version == version + 1


@pytest.mark.parametrize("seed", range(6))
def test_newly_stale_is_what_disagrees_after_less_what_disagreed_before(seed: int) -> None:
    """The definition, computed the long way (two full scans) against the one-scan version."""
    rng = np.random.default_rng(seed)
    store = EptStore()
    for gfn_ in rng.integers(0, 1 << 21, 300).tolist():
        level = [Level.K4, Level.K4, Level.M2][int(rng.integers(0, 3))]
        if not store.lookup(gfn_).present:
            store.install(gfn_, level, int(rng.choice([0x86, 0x8E, 0x80])))

    def random_map() -> IntervalMap:
        starts = np.unique(np.concatenate([[0], rng.integers(1, 1 << 21, 12)])).astype(np.int64)
        values = rng.choice([0x86, 0x8E, 0x80], len(starts)).astype(np.uint8)
        return IntervalMap(starts, values)

    before, after = random_map(), random_map()
    want = np.setdiff1d(stale_keys(store, after), stale_keys(store, before))
    got = newly_stale(store, before, after)
    assert len(want) and np.array_equal(got, want)
