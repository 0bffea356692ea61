"""CR0 and its four sources (docs/semantics.md#msrs-validity-and-cr0): guest writes, host
writes, RESET and INIT."""

from __future__ import annotations

import pytest

from mtrremu.core import cr0
from mtrremu.core.errors import InvalidArgument, RejectedHostWrite
from tests.helpers import CD0, CD1, FAITHFUL, GIB, make_vm, set_deftype


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (1 << 32, "bits 63:32"),
        (1 << 63, "bits 63:32"),
        (cr0.NW | cr0.PE, "NW=1 with CD=0"),
        (cr0.PG, "PG=1 with PE=0"),
        (cr0.PG | cr0.CD | cr0.NW, "PG=1 with PE=0"),
    ],
)
def test_a_bad_guest_write_is_a_gp_and_changes_nothing(value: int, reason: str) -> None:
    vm = make_vm("zap-all")
    result = vm.write_cr0(0, value)
    assert result.gp is not None and reason in result.gp
    assert result.counters.guest_gp == 1 and result.zap is None
    assert vm.vcpu(0).cr0 == cr0.RESET_VALUE


@pytest.mark.parametrize("value", [1 << 32, cr0.NW, cr0.PG])
def test_a_bad_host_write_is_an_error_and_changes_nothing(value: int) -> None:
    vm = make_vm("zap-all")
    with pytest.raises(RejectedHostWrite, match="CR0"):
        vm.write_cr0(0, value, host=True)
    assert vm.vcpu(0).cr0 == cr0.RESET_VALUE


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_values_outside_64_bits_are_malformed_requests(value: int) -> None:
    vm = make_vm("zap-all")
    with pytest.raises(InvalidArgument):
        vm.write_cr0(0, value)


def test_guest_writes_force_et_and_drop_undefined_low_bits() -> None:
    vm = make_vm("zap-all")
    result = vm.write_cr0(0, cr0.PE | (1 << 7) | (1 << 20))
    assert result.gp is None
    assert vm.vcpu(0).cr0 == cr0.PE | cr0.ET
    assert result.value == cr0.PE | cr0.ET


def test_reset_sets_cd_and_nw_and_init_keeps_them() -> None:
    vm = make_vm("zap-all")
    vm.write_cr0(0, CD0 | cr0.PG)
    assert vm.init(0).value == cr0.ET
    vm.write_cr0(0, CD1 | cr0.NW)
    assert vm.init(0).value == cr0.ET | cr0.CD | cr0.NW
    assert vm.reset(0).value == cr0.RESET_VALUE == 0x60000010


@pytest.mark.parametrize("quirk", [True, False])
@pytest.mark.parametrize("strategy", FAITHFUL)
def test_host_writes_reset_and_init_never_zap(strategy: str, quirk: bool) -> None:
    vm = make_vm(strategy, quirk_cd_nw_cleared=quirk)
    set_deftype(vm, 0, 0xC00)  # UC default: every CD flip changes every type
    vm.write_cr0(0, CD0, host=True)
    vm.fault_range(0, 0, GIB)
    present = vm.store.leaf_total
    before = vm.counters_snapshot()
    results = [
        vm.write_cr0(0, CD1, host=True),
        vm.write_cr0(0, CD0, host=True),
        vm.reset(0),  # CD 0 -> 1
        vm.write_cr0(0, CD0, host=True),
        vm.init(0),  # keeps CD=0
        vm.write_cr0(0, CD1 | cr0.NW, host=True),
        vm.init(0),  # keeps CD=1
    ]
    assert all(r.zap is None for r in results)
    assert [r.cd_toggled for r in results[:4]] == [True, True, True, True]
    assert vm.counters.zap_events == before.zap_events
    assert vm.counters.zaps_executed == before.zaps_executed
    assert vm.store.leaf_total == present


@pytest.mark.parametrize("strategy", ["zap-all", "fine-grained"])
def test_the_same_cd_flip_by_the_guest_does_zap(strategy: str) -> None:
    vm = make_vm(strategy)
    set_deftype(vm, 0, 0xC00)
    vm.write_cr0(0, CD0, host=True)
    vm.fault_range(0, 0, GIB)
    result = vm.write_cr0(0, CD1)
    assert result.zap is not None and result.counters.zap_events == 1
    assert vm.store.leaf_total == 0
