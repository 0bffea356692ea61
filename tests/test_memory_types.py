"""Memory types: one page's MTRR type (docs/semantics.md#the-memory-type-of-one-page), huge-page
consistency and the EPT memory type and IPAT a fault installs per profile
(docs/semantics.md#the-ept-entry-a-fault-installs).

§4 is KVM's ``kvm_mtrr_get_guest_memory_type``: E=0 → disabled type; FE=1 below 1 MiB → the fixed
type; else the valid variable ranges in KVM's list order (descending raw base) with KVM's
order-dependent loop (or the SDM's rules with ``Precedence.SDM``); no match → default type.
"""

from __future__ import annotations

import pytest

from mtrremu.core.config import Memslot
from mtrremu.core.memtype import (
    EptMemtype,
    Precedence,
    Profile,
    ept_memtype,
    guest_memory_type,
    range_is_consistent,
)
from mtrremu.core.memtypes import MemType
from mtrremu.core.mtrr_state import MtrrState
from mtrremu.core.vm import Vm
from tests.helpers import (
    ALL_STRATEGIES,
    CD0,
    CD1,
    GIB,
    MIB,
    SERIES,
    Level,
    MemslotKind,
    gpa,
    make_vm,
    mapping,
    set_deftype,
    set_fixed_all,
    set_var,
    var_mask,
)

UC, WC, WT, WP, WB = MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB
LEGAL = (UC, WC, WT, WP, WB)
E, FE = 1 << 11, 1 << 10
BOTH = (Precedence.KVM, Precedence.SDM)
GFN_3G = (3 * GIB) >> 12
GFN_1G = GIB >> 12
GFN_2M = (2 * MIB) >> 12


# -- building MTRR states ----------------------------------------------------------------------


def _state(deftype: int, maxphyaddr: int = 40) -> MtrrState:
    state = MtrrState(maxphyaddr)
    state.write(0x2FF, deftype)
    return state


def _var(state: MtrrState, pair: int, base: int, size: int, mtype: int, valid: bool = True) -> None:
    state.write(0x200 + 2 * pair, base | mtype)
    mask = var_mask(size, state.maxphyaddr)
    state.write(0x201 + 2 * pair, mask if valid else mask & ~(1 << 11))


def _fixed_all(state: MtrrState, mtype: int) -> None:
    for msr in (0x250, 0x258, 0x259, *range(0x268, 0x270)):
        state.write(msr, int.from_bytes(bytes([mtype] * 8), "little"))


def _fixed_byte(state: MtrrState, index: int, mtype: int) -> None:
    msr = (0x250, 0x258, 0x259, *range(0x268, 0x270))[index // 8]
    data = bytearray(state.read(msr).to_bytes(8, "little"))
    data[index % 8] = mtype
    state.write(msr, int.from_bytes(data, "little"))


def _overlap_state(first: int, second: int) -> MtrrState:
    """``first`` over [3 GiB, 4 GiB) (higher base: first in KVM's list), ``second`` over
    [0, 32 GiB); default type UC; MAXPHYADDR 36."""
    state = _state(E | UC, 36)
    _var(state, 0, 0, 32 * GIB, second)
    _var(state, 1, 3 * GIB, GIB, first)
    assert state.order == [1, 0]
    assert state.lookup(GFN_3G, GFN_3G + 1).types == (first, second)
    return state


# -- §4 step 1: MTRRs disabled -----------------------------------------------------------------


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize("gfn", (0x0, 0xFF, 0x100, GFN_1G, GFN_3G))
@pytest.mark.parametrize(("feature_mtrr", "expected"), [(True, UC), (False, WB)])
def test_disabled_mtrrs_give_disabled_type(
    feature_mtrr: bool, expected: MemType, gfn: int, precedence: Precedence
) -> None:
    state = _state(FE | WB)
    _fixed_all(state, WT)
    _var(state, 0, 0, 4 * GIB, WP)
    assert guest_memory_type(state, gfn, feature_mtrr, precedence) == expected


@pytest.mark.parametrize("strategy", ("kvm-6.5", "kvm-6.7", "fine-grained"))
@pytest.mark.parametrize(("feature_mtrr", "expected"), [(True, UC), (False, WB)])
def test_disabled_mtrrs_fault_path(feature_mtrr: bool, expected: MemType, strategy: str) -> None:
    vm = make_vm(strategy, feature_mtrr=feature_mtrr)
    set_var(vm, 0, 0, 0, 4 * GIB, WT)
    set_deftype(vm, 0, WT)
    vm.write_cr0(0, CD0, host=True)
    assert mapping(vm.access(0, gpa(GFN_1G + 7))).memtype == EptMemtype(expected, ipat=False)


# -- §4 step 2: fixed ranges -------------------------------------------------------------------


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize("gfn", (0x0, 0x7F, 0x80, 0x9F, 0xBF, 0xC0, 0xFF))
def test_fixed_enabled_below_1mib_gives_fixed_type_ignoring_variable(
    gfn: int, precedence: Precedence
) -> None:
    state = _state(E | FE | WB)
    _fixed_all(state, WT)
    _var(state, 0, 0, GIB, UC)
    assert guest_memory_type(state, gfn, True, precedence) == WT


@pytest.mark.parametrize(
    ("index", "inside", "outside"),
    [(0, 0x0, 0x10), (7, 0x7F, 0x6F), (8, 0x80, 0x84), (23, 0xBF, 0xBB), (87, 0xFF, 0xFE)],
)
def test_fixed_enabled_page_gets_its_own_byte(index: int, inside: int, outside: int) -> None:
    state = _state(E | FE | WB)
    _fixed_all(state, WB)
    _fixed_byte(state, index, WP)
    assert guest_memory_type(state, inside, True) == WP
    assert guest_memory_type(state, outside, True) == WB


def test_fixed_enabled_at_1mib_uses_variable_ranges() -> None:
    state = _state(E | FE | WB)
    _fixed_all(state, WT)
    _var(state, 0, 0, GIB, UC)
    assert guest_memory_type(state, 0x100, True) == UC


@pytest.mark.parametrize("gfn", (0x0, 0x80, 0xFF))
def test_fixed_disabled_below_1mib_uses_variable_ranges(gfn: int) -> None:
    state = _state(E | WB)
    _fixed_all(state, WT)
    _var(state, 0, 0, GIB, UC)
    assert guest_memory_type(state, gfn, True) == UC


def test_fixed_type_fault_path() -> None:
    vm = make_vm("kvm-6.7")
    set_fixed_all(vm, 0, WT)
    set_var(vm, 0, 0, 0, GIB, UC)
    set_deftype(vm, 0, E | FE | WB)
    vm.write_cr0(0, CD0, host=True)
    leaf = mapping(vm.access(0, 0xC3000))
    assert leaf.memtype == EptMemtype(WT, ipat=False)
    assert leaf.level is Level.K4


# -- §4 step 4: default type -------------------------------------------------------------------


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize("default", LEGAL, ids=lambda t: t.label)
def test_no_variable_match_gives_default_type(default: MemType, precedence: Precedence) -> None:
    state = _state(E | default)
    _var(state, 0, 4 * GIB, 4 * GIB, WC if default != WC else WP)
    assert guest_memory_type(state, GFN_1G, True, precedence) == default


def test_invalid_pair_does_not_match() -> None:
    state = _state(E | WB)
    _var(state, 0, 0, 4 * GIB, UC, valid=False)
    assert state.order == []
    assert guest_memory_type(state, GFN_1G, True) == WB


# -- §4 step 3: overlapping variable ranges -----------------------------------------------------


@pytest.mark.parametrize("maxphyaddr", (36, 40))
@pytest.mark.parametrize("uc_pair", (0, 1))
@pytest.mark.parametrize(
    ("precedence", "expected"), [(Precedence.KVM, WB), (Precedence.SDM, UC)], ids=["kvm", "sdm"]
)
def test_wb_32g_with_uc_3g_to_4g(
    precedence: Precedence, expected: MemType, uc_pair: int, maxphyaddr: int
) -> None:
    state = _state(E | UC, maxphyaddr)
    _var(state, 1 - uc_pair, 0, 32 * GIB, WB)
    _var(state, uc_pair, 3 * GIB, GIB, UC)
    assert state.order == [uc_pair, 1 - uc_pair]
    for gfn in (GFN_3G, (4 * GIB >> 12) - 1):
        assert guest_memory_type(state, gfn, True, precedence) == expected
    for gfn in (GFN_3G - 1, 4 * GIB >> 12, (32 * GIB >> 12) - 1):
        assert guest_memory_type(state, gfn, True, precedence) == WB


@pytest.mark.parametrize("strategy", ("kvm-6.5", "kvm-6.7", "fine-grained"))
@pytest.mark.parametrize("maxphyaddr", (36, 40))
@pytest.mark.parametrize(
    ("precedence", "expected"), [(Precedence.KVM, WB), (Precedence.SDM, UC)], ids=["kvm", "sdm"]
)
def test_wb_32g_with_uc_3g_to_4g_fault_path(
    precedence: Precedence, expected: MemType, maxphyaddr: int, strategy: str
) -> None:
    vm = make_vm(strategy, precedence=precedence, guest_maxphyaddr=maxphyaddr)
    set_var(vm, 0, 0, 0, 32 * GIB, WB)
    set_var(vm, 0, 1, 3 * GIB, GIB, UC)
    set_deftype(vm, 0, E | UC)
    vm.write_cr0(0, CD0, host=True)
    assert vm.vcpus[0].mtrr.order == [1, 0]
    leaf = mapping(vm.access(0, gpa(GFN_3G + 0x123)))
    assert leaf.memtype == EptMemtype(expected, ipat=False)
    assert leaf.level is Level.K4
    assert leaf.base_gpa == gpa(GFN_3G + 0x123)


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize("mtype", LEGAL, ids=lambda t: t.label)
def test_identical_types_give_that_type(mtype: MemType, precedence: Precedence) -> None:
    assert guest_memory_type(_overlap_state(mtype, mtype), GFN_3G, True, precedence) == mtype
    state = _state(E | (WC if mtype == UC else UC))
    _var(state, 0, 0, 4 * GIB, mtype)
    _var(state, 1, GIB, GIB, mtype)
    _var(state, 2, GIB, 2 * GIB, mtype)
    assert guest_memory_type(state, GFN_1G, True, precedence) == mtype


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize(("first", "second"), [(WT, WB), (WB, WT)], ids=["WT-WB", "WB-WT"])
def test_wt_and_wb_give_wt_in_both_orders(
    first: MemType, second: MemType, precedence: Precedence
) -> None:
    state = _overlap_state(first, second)
    assert guest_memory_type(state, GFN_3G, True, precedence) == WT


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize("first", (WB, WT, WC, WP), ids=lambda t: t.label)
def test_uc_second_in_list_gives_uc(first: MemType, precedence: Precedence) -> None:
    state = _overlap_state(first, UC)
    assert guest_memory_type(state, GFN_3G, True, precedence) == UC


@pytest.mark.parametrize(
    ("precedence", "expected"), [(Precedence.KVM, WB), (Precedence.SDM, UC)], ids=["kvm", "sdm"]
)
@pytest.mark.parametrize("second", (WB, WT, WC, WP), ids=lambda t: t.label)
def test_uc_first_in_list_then_other_type(
    second: MemType, precedence: Precedence, expected: MemType
) -> None:
    state = _overlap_state(UC, second)
    assert guest_memory_type(state, GFN_3G, True, precedence) == expected


UNDEFINED_PAIRS = [
    (WC, WB),
    (WB, WC),
    (WP, WT),
    (WT, WP),
    (WC, WT),
    (WT, WC),
    (WP, WB),
    (WB, WP),
    (WC, WP),
    (WP, WC),
]


@pytest.mark.parametrize("precedence", BOTH, ids=lambda p: p.value)
@pytest.mark.parametrize(
    ("first", "second"),
    UNDEFINED_PAIRS,
    ids=[f"{a.label}-{b.label}" for a, b in UNDEFINED_PAIRS],
)
def test_undefined_combination_gives_wb(
    first: MemType, second: MemType, precedence: Precedence
) -> None:
    state = _overlap_state(first, second)
    assert guest_memory_type(state, GFN_3G, True, precedence) == WB


THREE_RANGE_CASES = [
    # (first, second, third) in KVM's list order: KVM's answer, SDM's answer
    ((UC, WT, WB), WB, UC),  # the same types as the next row in another order: KVM's answer
    ((WT, WB, UC), UC, UC),  # differs, the SDM's does not
    ((WB, WT, UC), UC, UC),
    ((WB, UC, WT), UC, UC),
    ((UC, UC, WB), WB, UC),
    ((WT, WB, WC), WB, WB),
    ((WB, WB, WT), WT, WT),
    ((WT, WT, WB), WT, WT),
    ((WC, WC, WB), WB, WB),
    ((WC, WC, WC), WC, WC),
    ((WP, WB, UC), WB, UC),
    ((UC, WP, WB), WB, UC),
]


def _three_state(types: tuple[MemType, MemType, MemType]) -> MtrrState:
    """Three ranges covering 3 GiB with bases 3G > 2G > 0, so list order is ``types``."""
    state = _state(E | UC)
    _var(state, 5, 0, 4 * GIB, types[2])
    _var(state, 2, 2 * GIB, 2 * GIB, types[1])
    _var(state, 0, 3 * GIB, GIB, types[0])
    assert state.order == [0, 2, 5]
    assert state.lookup(GFN_3G, GFN_3G + 1).types == types
    return state


@pytest.mark.parametrize(
    ("types", "kvm", "sdm"),
    THREE_RANGE_CASES,
    ids=["-".join(t.label for t in c[0]) for c in THREE_RANGE_CASES],
)
def test_three_ranges(types: tuple[MemType, MemType, MemType], kvm: MemType, sdm: MemType) -> None:
    state = _three_state(types)
    assert guest_memory_type(state, GFN_3G, True, Precedence.KVM) == kvm
    assert guest_memory_type(state, GFN_3G, True, Precedence.SDM) == sdm


# -- §5 huge-page consistency ------------------------------------------------------------------


@pytest.mark.parametrize(("start", "pages"), [(0, 512), (GFN_2M, 512), (0, GFN_1G)])
def test_consistency_with_mtrrs_disabled_is_true(start: int, pages: int) -> None:
    state = _state(FE | WB)
    _fixed_all(state, WT)
    _fixed_byte(state, 3, UC)
    _var(state, 0, 0, 4 * GIB, WB)
    _var(state, 1, 3 * MIB, MIB, UC)
    assert range_is_consistent(state, start, pages)


@pytest.mark.parametrize(("start", "pages"), [(GFN_2M, 512), (0x400, 512), (GFN_1G, GFN_1G)])
def test_consistency_one_covering_range_is_true(start: int, pages: int) -> None:
    state = _state(E | UC)
    _var(state, 0, 0, 4 * GIB, WT)
    assert range_is_consistent(state, start, pages)


def test_consistency_two_types_overlapping_the_range_is_false() -> None:
    state = _state(E | WB)
    _var(state, 0, 0, GIB, WB)
    _var(state, 1, 2 * MIB, 2 * MIB, UC)
    assert not range_is_consistent(state, GFN_2M, 512)
    assert not range_is_consistent(state, 0, GFN_1G)
    assert range_is_consistent(state, 2 * GFN_2M, 512)


def test_consistency_no_range_touching_is_true() -> None:
    state = _state(E | UC)
    _var(state, 0, GIB, GIB, WT)
    assert range_is_consistent(state, GFN_2M, 512)


@pytest.mark.parametrize(("default", "expected"), [(WB, True), (UC, False), (WT, False)])
def test_consistency_partly_covered_depends_on_default(default: MemType, expected: bool) -> None:
    state = _state(E | default)
    _var(state, 0, 2 * MIB, MIB, WB)
    assert state.lookup(GFN_2M, 2 * GFN_2M).partial
    assert range_is_consistent(state, GFN_2M, 512) is expected


@pytest.mark.parametrize("low_pair", (0, 1))
def test_consistency_abutting_ranges_read_as_partial(low_pair: int) -> None:
    state = _state(E | UC)
    _var(state, low_pair, 2 * MIB, MIB, WT)
    _var(state, 1 - low_pair, 3 * MIB, MIB, WT)
    assert state.order == [1 - low_pair, low_pair]
    seen = state.lookup(GFN_2M, 2 * GFN_2M)
    assert seen.types == (WT, WT)
    assert seen.partial
    assert range_is_consistent(state, GFN_2M, 512) is False


def test_consistency_abutting_ranges_of_default_type_is_true() -> None:
    state = _state(E | WT)
    _var(state, 0, 2 * MIB, MIB, WT)
    _var(state, 1, 3 * MIB, MIB, WT)
    assert range_is_consistent(state, GFN_2M, 512) is True


def test_consistency_single_range_covering_same_region_is_true() -> None:
    state = _state(E | UC)
    _var(state, 0, 2 * MIB, 2 * MIB, WT)
    assert not state.lookup(GFN_2M, 2 * GFN_2M).partial
    assert range_is_consistent(state, GFN_2M, 512) is True


@pytest.mark.parametrize(
    ("ranges", "level"),
    [(((2 * MIB, MIB), (3 * MIB, MIB)), Level.K4), (((2 * MIB, 2 * MIB),), Level.M2)],
    ids=["abutting-4K", "single-2M"],
)
def test_abutting_ranges_fault_path_is_conservative(
    ranges: tuple[tuple[int, int], ...], level: Level
) -> None:
    vm = make_vm("kvm-6.7")
    for pair, (base, size) in enumerate(ranges):
        set_var(vm, 0, pair, base, size, WT)
    set_deftype(vm, 0, E | UC)
    vm.write_cr0(0, CD0, host=True)
    leaf = mapping(vm.access(0, gpa(GFN_2M + 0x1F)))
    assert leaf.level is level
    assert leaf.memtype == EptMemtype(WT, ipat=False)


def test_fixed_walk_2mib_at_0_walks_all_88_then_variable_list() -> None:
    state = _state(E | FE | UC)
    _fixed_all(state, WB)
    _var(state, 0, 0, 2 * MIB, WB)
    seen = state.lookup(0, 512)
    assert seen.types == (WB,) * 89
    assert not seen.partial
    assert range_is_consistent(state, 0, 512) is True


def test_fixed_walk_2mib_at_0_variable_type_differs_is_false() -> None:
    state = _state(E | FE | UC)
    _fixed_all(state, WB)
    _var(state, 0, 0, 2 * MIB, WT)
    assert state.lookup(0, 512).types == (WB,) * 88 + (WT,)
    assert range_is_consistent(state, 0, 512) is False


@pytest.mark.parametrize(("default", "expected"), [(WB, True), (UC, False)])
def test_fixed_walk_2mib_at_0_no_variable_range_depends_on_default(
    default: MemType, expected: bool
) -> None:
    state = _state(E | FE | default)
    _fixed_all(state, WB)
    seen = state.lookup(0, 512)
    assert seen.types == (WB,) * 88
    assert seen.partial
    assert range_is_consistent(state, 0, 512) is expected


@pytest.mark.parametrize(("default", "expected"), [(WB, True), (UC, False)])
def test_fixed_walk_coverage_does_not_count_for_variable_bookkeeping(
    default: MemType, expected: bool
) -> None:
    state = _state(E | FE | default)
    _fixed_all(state, WB)
    _var(state, 0, MIB, MIB, WB)
    seen = state.lookup(0, 512)
    assert seen.types == (WB,) * 89
    assert seen.partial
    assert range_is_consistent(state, 0, 512) is expected


@pytest.mark.parametrize("index", (0, 8, 24, 87))
def test_fixed_walk_2mib_at_0_one_odd_fixed_byte_is_false(index: int) -> None:
    state = _state(E | FE | WB)
    _fixed_all(state, WB)
    _fixed_byte(state, index, UC)
    _var(state, 0, 0, 2 * MIB, WB)
    assert range_is_consistent(state, 0, 512) is False


def test_fixed_walk_stops_at_range_ending_past_the_end() -> None:
    state = _state(E | FE | WB)
    _fixed_all(state, WT)
    _var(state, 0, 0, 2 * MIB, UC)
    assert state.lookup(0, 16).types == (WT,)
    assert state.lookup(0, 0x100).types == (WT,) * 88
    assert range_is_consistent(state, 0, 0x100) is True
    assert range_is_consistent(state, 0, 512) is False


# -- §5 the EPT memory type per profile ---------------------------------------------------------

PROFILES = (Profile.KVM_6_5, Profile.KVM_6_7, Profile.KVM_6_11)


def _mt(
    profile: Profile,
    *,
    tdp: bool = True,
    dma: bool = True,
    quirk: bool = True,
    cd: bool = False,
    device: bool = False,
    guest_type: MemType = UC,
) -> EptMemtype:
    return ept_memtype(
        profile,
        tdp=tdp,
        noncoherent_dma=dma,
        quirk_cd_nw_cleared=quirk,
        cd=cd,
        device=device,
        guest_type=lambda: guest_type,
    )


@pytest.mark.parametrize("quirk", (True, False), ids=["quirk", "noquirk"])
@pytest.mark.parametrize("cd", (False, True), ids=["cd0", "cd1"])
@pytest.mark.parametrize("dma", (True, False), ids=["dma", "nodma"])
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.value)
def test_table_device_memory_is_uc_without_ipat(
    profile: Profile, dma: bool, cd: bool, quirk: bool
) -> None:
    assert _mt(profile, dma=dma, cd=cd, quirk=quirk, device=True, guest_type=WB) == EptMemtype(
        UC, ipat=False
    )


@pytest.mark.parametrize("quirk", (True, False), ids=["quirk", "noquirk"])
@pytest.mark.parametrize("cd", (False, True), ids=["cd0", "cd1"])
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.value)
def test_table_not_honoured_without_noncoherent_dma_is_wb_ipat(
    profile: Profile, cd: bool, quirk: bool
) -> None:
    assert _mt(profile, dma=False, cd=cd, quirk=quirk) == EptMemtype(WB, ipat=True)


@pytest.mark.parametrize("cd", (False, True), ids=["cd0", "cd1"])
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.value)
def test_table_tdp_off_is_wb_ipat(profile: Profile, cd: bool) -> None:
    assert _mt(profile, tdp=False, cd=cd) == EptMemtype(WB, ipat=True)


CD1_TABLE = [
    # quirk, the guest's MTRR type, profile, expected
    (True, UC, Profile.KVM_6_5, EptMemtype(WB, ipat=True)),
    (True, UC, Profile.KVM_6_7, EptMemtype(WB, ipat=False)),
    (True, UC, Profile.KVM_6_11, EptMemtype(WB, ipat=False)),
    (False, WT, Profile.KVM_6_5, EptMemtype(UC, ipat=True)),
    (False, WT, Profile.KVM_6_7, EptMemtype(UC, ipat=True)),
    (False, WT, Profile.KVM_6_11, EptMemtype(WB, ipat=False)),
]


@pytest.mark.parametrize(
    ("quirk", "guest_type", "profile", "expected"),
    CD1_TABLE,
    ids=[f"quirk_{'on' if q else 'off'}-{p.value}" for q, _, p, _ in CD1_TABLE],
)
def test_table_cd1(
    quirk: bool, guest_type: MemType, profile: Profile, expected: EptMemtype
) -> None:
    assert _mt(profile, cd=True, quirk=quirk, guest_type=guest_type) == expected


@pytest.mark.parametrize("quirk", (True, False), ids=["quirk", "noquirk"])
@pytest.mark.parametrize("guest_type", LEGAL, ids=lambda t: t.label)
@pytest.mark.parametrize(
    ("profile", "honours"),
    [(Profile.KVM_6_5, True), (Profile.KVM_6_7, True), (Profile.KVM_6_11, False)],
    ids=["6.5", "6.7", "6.11"],
)
def test_table_otherwise_mtrr_type_or_wb(
    profile: Profile, honours: bool, guest_type: MemType, quirk: bool
) -> None:
    expected = EptMemtype(guest_type if honours else WB, ipat=False)
    assert _mt(profile, quirk=quirk, guest_type=guest_type) == expected


# -- §5 through the VM --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "profile"),
    [
        ("kvm-6.5", Profile.KVM_6_5),
        ("kvm-6.7", Profile.KVM_6_7),
        ("kvm-6.11", Profile.KVM_6_11),
        *((name, Profile.KVM_6_7) for name in SERIES),
    ],
)
def test_strategy_profile(strategy: str, profile: Profile) -> None:
    assert make_vm(strategy).profile is profile


DEVICE_SLOTS = (
    Memslot.from_bytes(0, 2 * GIB, name="ram"),
    Memslot.from_bytes(3 * GIB, 16 * MIB, MemslotKind.DEVICE, name="bar"),
)


@pytest.mark.parametrize("cr0", (CD0, CD1), ids=["cd0", "cd1"])
@pytest.mark.parametrize("dma", (0, 1), ids=["nodma", "dma"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_device_memslot_faults_uc_without_ipat(strategy: str, dma: int, cr0: int) -> None:
    vm = make_vm(strategy, memslots=DEVICE_SLOTS, noncoherent_dma=dma)
    set_var(vm, 0, 0, 0, 4 * GIB, WB)
    set_deftype(vm, 0, E | WB)
    vm.write_cr0(0, cr0, host=True)
    assert mapping(vm.access(0, gpa(GFN_3G + 5))).memtype == EptMemtype(UC, ipat=False)
    assert mapping(vm.access(0, gpa(GFN_1G + 5))).memtype.type is WB


VM_TABLE = [
    # strategy, tdp, dma, cr0, quirk, expected for a RAM page in a UC MTRR range
    ("kvm-6.5", True, 0, CD0, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.7", True, 0, CD0, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.11", True, 0, CD0, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.5", False, 1, CD0, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.7", False, 1, CD0, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.11", False, 1, CD0, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.5", True, 1, CD1, True, EptMemtype(WB, ipat=True)),
    ("kvm-6.7", True, 1, CD1, True, EptMemtype(WB, ipat=False)),
    ("kvm-6.11", True, 1, CD1, True, EptMemtype(WB, ipat=False)),
    ("kvm-6.5", True, 1, CD1, False, EptMemtype(UC, ipat=True)),
    ("kvm-6.7", True, 1, CD1, False, EptMemtype(UC, ipat=True)),
    ("kvm-6.11", True, 1, CD1, False, EptMemtype(WB, ipat=False)),
    ("kvm-6.5", True, 1, CD0, True, EptMemtype(UC, ipat=False)),
    ("kvm-6.7", True, 1, CD0, True, EptMemtype(UC, ipat=False)),
    ("kvm-6.11", True, 1, CD0, True, EptMemtype(WB, ipat=False)),
]


def _vm_table_id(case: tuple[str, bool, int, int, bool, EptMemtype]) -> str:
    strategy, tdp, dma, cr0, quirk, _ = case
    cd = "cd1" if cr0 == CD1 else "cd0"
    return f"{strategy}-tdp{int(tdp)}-dma{dma}-{cd}-quirk{int(quirk)}"


@pytest.mark.parametrize(
    ("strategy", "tdp", "dma", "cr0", "quirk", "expected"),
    VM_TABLE,
    ids=[_vm_table_id(c) for c in VM_TABLE],
)
def test_table_through_fault_path(
    strategy: str, tdp: bool, dma: int, cr0: int, quirk: bool, expected: EptMemtype
) -> None:
    vm: Vm = make_vm(strategy, tdp=tdp, noncoherent_dma=dma, quirk_cd_nw_cleared=quirk)
    set_var(vm, 0, 0, GIB, GIB, UC)
    set_deftype(vm, 0, E | WB)
    vm.write_cr0(0, cr0, host=True)
    assert mapping(vm.access(0, gpa(GFN_1G + 0x42))).memtype == expected
