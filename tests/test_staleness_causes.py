"""Every known way a strategy leaves stale leaves, each pinned by a focused test
(docs/oracle.md#declared-gaps).

The stateful test attributes any new staleness outside its protocol to one of these causes:

* a variable range changed while E=1 and CD=0 is zapped only at its new span (every strategy:
  ``update_mtrr`` computes the span after the write);
* host CR0 writes and RESET change CD without any zap (every strategy);
* released KVM (``kvm-6.5``, ``kvm-6.7``) does not zap on a CD toggle with the quirk on — the
  flaws raised in the series' review;
* the fine-grained zap reads only the toggling vCPU's MTRRs, so leaves faulted under another
  vCPU's view survive it;
* with the posted zap-list window a vCPU can return with its range still queued
  (``test_concurrency.py``);
* a zap under the MMU lock held for read (patch 12, the ``*-shared`` rows) leaves a huge leaf
  straddling the range's edge in place.
"""

from __future__ import annotations

import pytest

from mtrremu.core import msrs
from mtrremu.core.config import Memslot
from mtrremu.core.memtype import WB_IPAT, WB_NO_IPAT, EptMemtype
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import Level
from mtrremu.core.vm import Vm
from tests.helpers import (
    CD0,
    CD1,
    FAITHFUL,
    GIB,
    SERIES,
    SHARED,
    gfn,
    gpa,
    make_vm,
    mapping,
    set_deftype,
    set_fixed_all,
    set_var,
)

UC = EptMemtype(MemType.UC, ipat=False)
PAGE = gfn(3 * GIB + 0x5000)


def uc_hole(strategy: str, *, cd0: bool = True) -> Vm:
    """MTRRs enabled, WB default, UC over [3 GiB, 4 GiB); CR0.CD cleared by the host."""
    vm = make_vm(strategy)
    set_var(vm, 0, 0, 3 * GIB, GIB, MemType.UC)
    set_deftype(vm, 0, 0xC06)
    if cd0:
        vm.write_cr0(0, CD0, host=True)
    return vm


@pytest.mark.parametrize("strategy", [s for s in FAITHFUL if s != "kvm-6.11"])
def test_a_range_moved_with_e1_and_cd0_is_zapped_only_at_its_new_span(strategy: str) -> None:
    vm = uc_hole(strategy)
    assert mapping(vm.access(0, gpa(PAGE))).memtype == UC
    # Move the UC pair to 1 GiB: KVM zaps [1 GiB, 2 GiB) only.
    result = vm.write_msr(0, msrs.PHYSBASE0, GIB | MemType.UC)
    assert result.zap is not None and [r.start for r in result.zap.requested] == [gfn(GIB)]
    stale = vm.stale(0)
    assert stale.count == 1
    (leaf,) = stale.examples
    assert (leaf.level, leaf.base_gpa, leaf.have, leaf.want) == (
        Level.G1,
        3 * GIB,
        UC,
        WB_NO_IPAT,
    )


@pytest.mark.parametrize("strategy", SERIES)
def test_the_same_move_under_cd1_is_caught_by_the_cd_clear(strategy: str) -> None:
    vm = uc_hole(strategy)
    vm.access(0, gpa(PAGE))
    vm.write_cr0(0, CD1)  # the protocol: change ranges with CD=1
    vm.write_msr(0, msrs.PHYSBASE0, GIB | MemType.UC)
    vm.write_cr0(0, CD0)
    assert vm.stale(0).clean


@pytest.mark.parametrize("strategy", FAITHFUL)
def test_host_cr0_writes_change_cd_without_a_zap(strategy: str) -> None:
    vm = uc_hole(strategy)
    vm.access(0, gpa(PAGE))
    vm.write_cr0(0, CD1, host=True)  # KVM_SET_SREGS: no zap
    report = vm.stale(0)
    if strategy == "kvm-6.11":
        assert report.clean  # memory types never depend on CD there
        return
    assert report.count == 1
    want = WB_IPAT if strategy == "kvm-6.5" else WB_NO_IPAT
    assert (report.examples[0].have, report.examples[0].want) == (UC, want)


@pytest.mark.parametrize("strategy", FAITHFUL)
def test_reset_sets_cd_without_a_zap(strategy: str) -> None:
    vm = uc_hole(strategy)
    vm.access(0, gpa(PAGE))
    assert vm.reset(0).zap is None
    assert vm.stale(0).count == (0 if strategy == "kvm-6.11" else 1)


def test_kvm_6_5_keeps_ipat_leaves_made_under_cd1_after_cd_clears() -> None:
    """The review's first flaw: a CD=1 fault is WB+IPAT; CD 1→0 with the quirk on does not
    zap, and a fresh fault would give WB without IPAT."""
    vm = make_vm("kvm-6.5")
    set_deftype(vm, 0, 0xC06)
    assert mapping(vm.access(0, gpa(PAGE))).memtype == WB_IPAT
    assert vm.write_cr0(0, CD0).zap is None
    report = vm.stale(0)
    assert report.count == 1
    assert (report.examples[0].have, report.examples[0].want) == (WB_IPAT, WB_NO_IPAT)


def test_kvm_6_7_keeps_wb_leaves_over_a_uc_range_after_cd_clears() -> None:
    """The second flaw: 6.7 dropped IPAT for CD=1 but still does not zap on CD 1→0 with the
    quirk on, so WB faulted while CD=1 survives inside a UC MTRR range."""
    vm = uc_hole("kvm-6.7", cd0=False)
    first = mapping(vm.access(0, gpa(PAGE)))
    assert (first.memtype, first.level) == (WB_NO_IPAT, Level.G1)
    vm.write_cr0(0, CD0)
    report = vm.stale(0)
    assert report.count == 1
    assert (report.examples[0].have, report.examples[0].want) == (WB_NO_IPAT, UC)


@pytest.mark.parametrize("strategy", SERIES)
def test_the_series_zaps_those_leaves_on_cd_clear(strategy: str) -> None:
    vm = uc_hole(strategy, cd0=False)
    vm.access(0, gpa(PAGE))
    vm.write_cr0(0, CD0)
    assert vm.stale(0).clean


@pytest.mark.parametrize(("strategy", "survives"), [("fine-grained", True), ("zap-all", False)])
def test_fine_grained_reads_only_the_toggling_vcpus_mtrrs(strategy: str, survives: bool) -> None:
    """vCPU 0 has a UC range and faults UC there; vCPU 1 has no ranges and toggles CD: its
    fine-grained zap looks at its own MTRRs only and leaves vCPU 0's UC leaf, stale for it."""
    vm = make_vm(strategy, vcpus=2)
    set_var(vm, 0, 0, 3 * GIB, GIB, MemType.UC)
    for vcpu in (0, 1):
        set_deftype(vm, vcpu, 0xC06)
        vm.write_cr0(vcpu, CD0)
    assert mapping(vm.access(0, gpa(PAGE))).memtype == UC
    result = vm.write_cr0(1, CD1)
    assert result.zap is not None
    assert vm.stale(0).clean
    assert vm.stale(1).count == (1 if survives else 0)


@pytest.mark.parametrize("strategy", SHARED)
def test_a_shared_lock_zap_leaves_a_straddling_huge_leaf(strategy: str) -> None:
    vm = make_vm(strategy, memslots=(Memslot.from_bytes(0, 4 * GIB),), track_staleness=True)
    set_deftype(vm, 0, 0xC06)  # E, FE, WB default; every fixed range WB (reset values are 0)
    set_fixed_all(vm, 0, MemType.WB)
    vm.write_cr0(0, CD0)
    assert mapping(vm.access(0, 0x100000)).level is Level.G1  # [0, 1 GiB) is one leaf
    # A fixed-range write with E=1, FE=1, CD=0 zaps its span, [0, 512 KiB): inside the leaf.
    result = vm.write_msr(0, msrs.FIXED_MSRS[0], 0)  # [0, 512 KiB) becomes UC
    assert result.counters.straddling_skipped == 1
    assert result.counters.leaves_removed == 0
    stale = vm.stale(0)
    assert stale.count == 1 and stale.by_level[Level.G1] == 1
    assert vm.staleness.excused == {"straddling-leaf": 1}
    assert vm.staleness.stale_events == 0
