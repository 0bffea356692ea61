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
from mtrremu.core.oracle import stale_keys, stale_keys_near
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
