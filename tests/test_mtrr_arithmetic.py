"""Variable-range arithmetic and KVM's list order (docs/semantics.md#msrs-validity-and-cr0), and
the fixed-range lookup.

A pair's span is KVM's ``var_mtrr_range`` in u64: ``start = base & ~0xFFF``, ``m = stored mask &
~0xFFF`` (stored masks have every bit at or above MAXPHYADDR set), ``end = (start | ~m) + 1``.
Valid pairs are kept in descending raw PhysBase order (type byte included); a newly valid pair
goes before the first entry whose raw base is <= its own.
"""

from __future__ import annotations

import itertools

import pytest

from mtrremu.core.mtrr_state import MtrrState
from mtrremu.core.units import GfnRange
from mtrremu.core.vm import Vm
from tests.helpers import CD0, GIB, MIB, make_vm, mapping, set_deftype, var_mask

UC, WC, WT, WP, WB = 0, 1, 4, 5, 6
E, FE = 1 << 11, 1 << 10
V = 1 << 11
MAXPHYADDRS = (36, 40, 46)
FIXED_MSR_LIST = (0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F)


def _vm(maxphyaddr: int = 40, strategy: str = "kvm-6.5") -> Vm:
    return make_vm(strategy, guest_maxphyaddr=maxphyaddr)


def _base(vm: Vm, pair: int, value: int) -> None:
    assert vm.write_msr(0, 0x200 + 2 * pair, value).gp is None


def _mask(vm: Vm, pair: int, value: int) -> None:
    assert vm.write_msr(0, 0x201 + 2 * pair, value).gp is None


def _order(vm: Vm) -> list[int]:
    return list(vm.vcpus[0].mtrr.order)


def _span(vm: Vm, pair: int) -> tuple[int, int]:
    return vm.vcpus[0].mtrr.var_range_gpa(pair)


# -- var_mtrr_range -----------------------------------------------------------------------------


@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_zero_written_mask_spans_base_to_top_of_physical_space(maxphyaddr: int) -> None:
    vm = _vm(maxphyaddr)
    _base(vm, 2, 0x4000_0000 | WB)
    _mask(vm, 2, 0)
    assert _span(vm, 2) == (0x4000_0000, 1 << maxphyaddr)
    assert _order(vm) == []


@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_valid_bit_only_mask_is_a_valid_range_to_top_of_physical_space(maxphyaddr: int) -> None:
    vm = _vm(maxphyaddr)
    set_deftype(vm, 0, E | UC)
    _base(vm, 2, 0x4000_0000 | WT)
    _mask(vm, 2, V)
    assert _span(vm, 2) == (0x4000_0000, 1 << maxphyaddr)
    assert _order(vm) == [2]
    last_gfn = ((1 << maxphyaddr) >> 12) - 1
    seen = vm.vcpus[0].mtrr.lookup(last_gfn, last_gfn + 1)
    assert seen.types == (WT,)
    assert vm.vcpus[0].mtrr.lookup(0x3FFFF, 0x40000).types == ()


@pytest.mark.parametrize(
    ("base", "size", "expected"),
    [
        (0x1_0000_3000, GIB, (0x1_0000_3000, 0x1_4000_0000)),
        (0x8000_1000, 2 * GIB, (0x8000_1000, 0x1_0000_0000)),
        (0x20_5000, 2 * MIB, (0x20_5000, 0x40_0000)),
        (0xFFFF_F000, 4 * 1024, (0xFFFF_F000, 0x1_0000_0000)),
    ],
    ids=["4G+12K/1G", "2G+4K/2G", "2M+20K/2M", "4G-4K/4K"],
)
def test_misaligned_base_spans_to_next_aligned_boundary(
    base: int, size: int, expected: tuple[int, int]
) -> None:
    vm = _vm()
    _base(vm, 1, base | WB)
    _mask(vm, 1, var_mask(size))
    assert _span(vm, 1) == expected


def test_type_byte_is_not_part_of_the_start() -> None:
    vm = _vm()
    _base(vm, 0, 0x4000_0000 | WP)
    _mask(vm, 0, var_mask(GIB))
    assert _span(vm, 0) == (0x4000_0000, 0x8000_0000)
    assert vm.vcpus[0].mtrr.var_range_gfns(0) == GfnRange(0x40000, 0x80000)


def test_base_write_uses_the_old_mask() -> None:
    vm = _vm()
    _base(vm, 4, 0x4000_0000 | WB)
    _mask(vm, 4, var_mask(GIB))
    assert _span(vm, 4) == (0x4000_0000, 0x8000_0000)
    _base(vm, 4, 0xC000_0000 | UC)
    assert _span(vm, 4) == (0xC000_0000, 0x1_0000_0000)
    _base(vm, 4, 0x1_2345_6000 | UC)
    assert _span(vm, 4) == (0x1_2345_6000, 0x1_4000_0000)
    _mask(vm, 4, var_mask(16 * GIB))
    assert _span(vm, 4) == (0x1_2345_6000, 0x4_0000_0000)


def test_base_write_zaps_span_from_new_base_and_old_mask() -> None:
    vm = _vm()
    set_deftype(vm, 0, E | WB)
    _base(vm, 4, 0x4000_0000 | WB)
    _mask(vm, 4, var_mask(GIB))
    result = vm.write_msr(0, 0x208, 0xC000_0000 | UC)
    assert result.gp is None
    assert result.zap is not None
    assert result.zap.requested == [GfnRange(0xC0000, 0x100000)]


@pytest.mark.parametrize(
    ("base", "mask", "expected"),
    [
        # bit 31 clear inside bits 39:12: ~m = 0x8000_0FFF
        (0x0, 0xFF_7FFF_F000 | V, (0x0, 0x8000_1000)),
        (0x1_0000_0000, 0xFF_7FFF_F000 | V, (0x1_0000_0000, 0x1_8000_1000)),
        # bit 13 clear, bit 12 set: the SDM would match 2 pages, KVM spans 3
        (0x2000_0000, 0xFF_FFFF_D000 | V, (0x2000_0000, 0x2000_3000)),
    ],
    ids=["hole-bit31-base0", "hole-bit31-base4G", "hole-bit13"],
)
def test_non_contiguous_mask_gives_one_contiguous_span(
    base: int, mask: int, expected: tuple[int, int]
) -> None:
    vm = _vm()
    _base(vm, 0, base | WT)
    _mask(vm, 0, mask)
    assert _span(vm, 0) == expected


def test_non_contiguous_mask_matches_a_page_the_sdm_would_not() -> None:
    vm = _vm()
    set_deftype(vm, 0, E | UC)
    _base(vm, 0, 0x2000_0000 | WT)
    _mask(vm, 0, 0xFF_FFFF_D000 | V)
    mtrr = vm.vcpus[0].mtrr
    assert mtrr.lookup(0x20001, 0x20002).types == (WT,)
    assert mtrr.lookup(0x20003, 0x20004).types == ()


def test_never_written_mask_wraps_end_to_zero() -> None:
    vm = _vm()
    _base(vm, 5, 0x4000_0000 | WB)
    assert vm.vcpus[0].mtrr.masks[5] == 0
    assert _span(vm, 5) == (0x4000_0000, 0)
    assert vm.vcpus[0].mtrr.var_range_gfns(5).empty
    assert _order(vm) == []


def test_never_written_mask_base_write_zaps_an_empty_range() -> None:
    vm = _vm()
    set_deftype(vm, 0, E | WB)
    assert vm.write_cr0(0, CD0, host=True).gp is None
    mapping(vm.access(0, 0x40000000))  # a leaf at 1 GiB
    result = vm.write_msr(0, 0x20A, 0x4000_0000 | UC)
    assert result.zap is not None
    assert result.zap.requested == [GfnRange(0x40000, 0)]
    assert result.counters.leaves_removed == 0
    assert vm.lookup(0x40000000).mapping is not None


def test_only_valid_pairs_are_in_the_list() -> None:
    vm = _vm()
    for pair in range(4):
        _base(vm, pair, (pair + 1) * GIB | WB)
        _mask(vm, pair, var_mask(GIB) if pair % 2 == 0 else var_mask(GIB) & ~V)
    assert _order(vm) == [2, 0]


# -- KVM's list order ---------------------------------------------------------------------------

#: pair -> raw PhysBase: descending raw order is 3, 1, 2, 0.
DISTINCT_BASES = {0: 0x0 | WB, 1: 0x8000_0000 | UC, 2: 0x4000_0000 | WT, 3: 0x1_0000_0000 | WB}


@pytest.mark.parametrize(
    "validation_order", list(itertools.permutations(range(4))), ids=lambda p: "".join(map(str, p))
)
def test_list_is_descending_raw_base_whatever_the_validation_order(
    validation_order: tuple[int, ...],
) -> None:
    vm = _vm()
    for pair in validation_order:
        _base(vm, pair, DISTINCT_BASES[pair])
        _mask(vm, pair, var_mask(GIB))
    assert _order(vm) == [3, 1, 2, 0]


@pytest.mark.parametrize(
    ("validation_order", "expected"),
    [((0, 1, 2), [2, 1, 0]), ((2, 0, 1), [1, 0, 2]), ((1, 2, 0), [0, 2, 1])],
    ids=["012", "201", "120"],
)
def test_equal_raw_bases_newest_first(
    validation_order: tuple[int, ...], expected: list[int]
) -> None:
    vm = _vm()
    for pair in validation_order:
        _base(vm, pair, 0x4000_0000 | WB)
        _mask(vm, pair, var_mask(GIB))
    assert _order(vm) == expected


@pytest.mark.parametrize(
    "validation_order", list(itertools.permutations(range(3))), ids=lambda p: "".join(map(str, p))
)
def test_type_byte_orders_pairs_at_the_same_address(validation_order: tuple[int, ...]) -> None:
    bases = {0: 0x4000_0000 | UC, 1: 0x4000_0000 | WB, 2: 0x4000_0000 | WT}
    vm = _vm()
    for pair in validation_order:
        _base(vm, pair, bases[pair])
        _mask(vm, pair, var_mask(GIB))
    assert _order(vm) == [1, 2, 0]


def test_tie_is_inserted_before_its_equal_among_other_pairs() -> None:
    bases = {0: 0x8000_0000 | WB, 1: 0x4000_0000 | WB, 2: 0x4000_0000 | WB, 3: 0x0 | WB}
    vm = _vm()
    for pair in (1, 0, 3, 2):
        _base(vm, pair, bases[pair])
        _mask(vm, pair, var_mask(GIB))
    assert _order(vm) == [0, 2, 1, 3]


def test_clearing_valid_removes_the_pair_and_keeps_the_rest_ordered() -> None:
    vm = _vm()
    for pair, base in DISTINCT_BASES.items():
        _base(vm, pair, base)
        _mask(vm, pair, var_mask(GIB))
    _mask(vm, 1, var_mask(GIB) & ~V)
    assert _order(vm) == [3, 2, 0]
    assert vm.read_msr(0, 0x203).value == var_mask(GIB) & ~V
    assert vm.read_msr(0, 0x202).value == DISTINCT_BASES[1]


def test_revalidating_reinserts_at_ordered_position() -> None:
    vm = _vm()
    for pair, base in DISTINCT_BASES.items():
        _base(vm, pair, base)
        _mask(vm, pair, var_mask(GIB))
    _mask(vm, 1, var_mask(GIB) & ~V)
    _mask(vm, 1, var_mask(GIB))
    assert _order(vm) == [3, 1, 2, 0]


def test_revalidating_a_tied_pair_puts_it_before_its_equal() -> None:
    vm = _vm()
    for pair in (0, 1):
        _base(vm, pair, 0x4000_0000 | WB)
        _mask(vm, pair, var_mask(GIB))
    assert _order(vm) == [1, 0]
    _mask(vm, 0, 0)
    assert _order(vm) == [1]
    _mask(vm, 0, var_mask(GIB))
    assert _order(vm) == [0, 1]


def test_rewriting_same_base_of_valid_pair_moves_it_before_its_equal() -> None:
    vm = _vm()
    for pair in (0, 1):
        _base(vm, pair, 0x4000_0000 | WB)
        _mask(vm, pair, var_mask(GIB))
    assert _order(vm) == [1, 0]
    _base(vm, 0, 0x4000_0000 | WB)
    assert _order(vm) == [0, 1]


def test_rewriting_same_mask_of_valid_pair_moves_it_before_its_equal() -> None:
    vm = _vm()
    for pair in (0, 1):
        _base(vm, pair, 0x4000_0000 | WB)
        _mask(vm, pair, var_mask(GIB))
    _mask(vm, 0, var_mask(GIB))
    assert _order(vm) == [0, 1]


def test_base_write_of_valid_pair_moves_it_to_its_new_position() -> None:
    vm = _vm()
    for pair, base in DISTINCT_BASES.items():
        _base(vm, pair, base)
        _mask(vm, pair, var_mask(GIB))
    _base(vm, 0, 0x2_0000_0000 | WB)
    assert _order(vm) == [0, 3, 1, 2]
    _base(vm, 3, 0x0 | UC)
    assert _order(vm) == [0, 1, 2, 3]


def test_base_write_of_invalid_pair_leaves_it_out_of_the_list() -> None:
    vm = _vm()
    _base(vm, 0, 0x8000_0000 | WB)
    _mask(vm, 0, var_mask(GIB))
    _base(vm, 1, 0x4000_0000 | WB)
    _mask(vm, 1, var_mask(GIB) & ~V)
    _base(vm, 1, 0xC000_0000 | WB)
    assert _order(vm) == [0]


# -- MtrrState.lookup on the fixed ranges -------------------------------------------------------


def _fixed_bounds(index: int) -> tuple[int, int]:
    """Gfn ``[start, end)`` of fixed range ``index`` (0-87), written out from the SDM layout."""
    if index < 8:
        lo, size = index * 0x10000, 0x10000
    elif index < 24:
        lo, size = 0x80000 + (index - 8) * 0x4000, 0x4000
    else:
        lo, size = 0xC0000 + (index - 24) * 0x1000, 0x1000
    return lo >> 12, (lo + size) >> 12


def _fixed_state(odd_index: int, deftype: int) -> MtrrState:
    """Fixed ranges all WB except ``odd_index`` (UC); a WT pair covering [0, 2 MiB)."""
    state = MtrrState(40)
    for slot, msr in enumerate(FIXED_MSR_LIST):
        data = bytearray([WB] * 8)
        if odd_index // 8 == slot:
            data[odd_index % 8] = UC
        state.write(msr, int.from_bytes(data, "little"))
    state.write(0x200, 0x0 | WT)
    state.write(0x201, var_mask(2 * MIB))
    state.write(0x2FF, deftype)
    return state


@pytest.mark.parametrize("index", range(88))
def test_fixed_enabled_page_sees_exactly_its_fixed_range(index: int) -> None:
    state = _fixed_state(index, E | FE | WC)
    lo, hi = _fixed_bounds(index)
    for gfn in (lo, hi - 1):
        seen = state.lookup(gfn, gfn + 1)
        assert seen.types == (UC,)
        assert not seen.partial
        assert not seen.disabled
    if index > 0:
        assert state.lookup(lo - 1, lo).types == (WB,)
    if hi < 0x100:
        assert state.lookup(hi, hi + 1).types == (WB,)


@pytest.mark.parametrize("index", (0, 7, 8, 23, 24, 87))
def test_fixed_disabled_page_below_1mib_sees_variable_ranges(index: int) -> None:
    state = _fixed_state(index, E | WC)
    lo, hi = _fixed_bounds(index)
    for gfn in (lo, hi - 1):
        seen = state.lookup(gfn, gfn + 1)
        assert seen.types == (WT,)
        assert not seen.partial


def test_fixed_disabled_page_below_1mib_without_variable_match_sees_nothing() -> None:
    state = MtrrState(40)
    state.write(0x250, int.from_bytes(bytes([UC] * 8), "little"))
    state.write(0x2FF, E | WB)
    seen = state.lookup(0x10, 0x11)
    assert seen.types == ()
    assert seen.partial


def test_fixed_enabled_page_at_1mib_sees_variable_ranges() -> None:
    state = _fixed_state(87, E | FE | WC)
    assert state.lookup(0x100, 0x101).types == (WT,)
    assert state.lookup(0xFF, 0x100).types == (UC,)


def test_lookup_with_mtrrs_disabled_walks_nothing() -> None:
    state = _fixed_state(0, FE | WB)
    seen = state.lookup(0x0, 0x1)
    assert seen.disabled
    assert seen.types == ()


# -- a write of the value held ----------------------------------------------------------------

#: Values for every kind of MTRR MSR, valid for each (types UC/WB, V set or not, 36-bit masks).
_HELD_VALUES = {
    0x2FF: (0, 0x806, 0xC06, 0xC00),
    **{msr: (0, 0x0606060606060606, 0x0006000600060006) for msr in FIXED_MSR_LIST},
    **{0x200 + 2 * pair: (0, WB, 0x8000_0000 | WB, 0x8000_0000 | UC) for pair in range(4)},
    **{0x201 + 2 * pair: (0, V, 0xF_C000_0000 | V, 0xF_C000_0000) for pair in range(4)},
}


def _fields(state: MtrrState) -> tuple[object, ...]:
    """Everything a write may change, masks as stored (not as read back)."""
    return state.deftype, bytes(state.fixed), list(state.bases), list(state.masks), state.order


#: Register states a rewrite must tell apart: reset; masks written 0 (stored with the high
#: bits, unlike never-written ones); one valid pair; two valid pairs with equal bases (a
#: rewrite of the later one moves it before its equal); fixed ranges and defType set.
_HISTORIES: tuple[tuple[tuple[int, int], ...], ...] = (
    (),
    ((0x201, 0), (0x203, 0), (0x200, WB)),
    ((0x200, 0x8000_0000 | WB), (0x201, 0xF_C000_0000 | V)),
    (
        (0x200, 0x8000_0000 | WB),
        (0x201, 0xF_C000_0000 | V),
        (0x202, 0x8000_0000 | WB),
        (0x203, 0xF_C000_0000 | V),
    ),
    ((0x2FF, 0xC06), (0x250, 0x0606060606060606), (0x26F, 0x0006000600060006)),
)


@pytest.mark.parametrize("history", _HISTORIES)
def test_a_rewrite_is_taken_only_when_a_write_would_change_nothing(
    history: tuple[tuple[int, int], ...],
) -> None:
    """Prediction from write(), for every MTRR MSR and value: rewrite() says True only where
    write() would leave every stored field and the list order as they are (and then
    before_last_write is the state now); when it says False, nothing changed."""
    taken = 0
    for msr, values in _HELD_VALUES.items():
        for value in values:
            state = MtrrState(36)
            for written, held in history:
                state.write(written, held)
            before, version = _fields(state), state.version
            twin = state.copy()
            if state.rewrite(msr, value):
                taken += 1
                assert not twin.write(msr, value), (msr, value)
                assert _fields(twin) == _fields(state) == before, (msr, value)
                assert _fields(state.before_last_write()) == before, (msr, value)
            else:
                assert _fields(state) == before, (msr, value)
            assert state.version == version
    assert taken  # every history holds some of these values


def test_rewriting_a_valid_pair_or_a_never_written_mask_takes_the_full_path() -> None:
    state = MtrrState(36)
    assert not state.rewrite(0x201, 0)  # stored 0, a written 0 is stored with the high bits
    state.write(0x200, 0x8000_0000 | WB)
    state.write(0x201, 0xF_C000_0000 | V)
    assert not state.rewrite(0x200, 0x8000_0000 | WB)  # valid: back into the list
    assert not state.rewrite(0x10, 0)  # not an MTRR MSR
    assert state.rewrite(0x203, 0) is False and state.rewrite(0x202, 0)
