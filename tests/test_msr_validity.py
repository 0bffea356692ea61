"""MSR validity rules of docs/semantics.md#msrs-validity-and-cr0.

Every rule is checked twice: for a guest WRMSR (a #GP reported in the result, counted once, nothing
changed) and for a host-initiated write (KVM_SET_MSRS: a ``RejectedHostWrite`` naming the MSR, no
#GP, nothing changed). Accepted writes of every MSR read back exactly, masks included (KVM keeps
the bits at or above MAXPHYADDR set internally and strips them on read).
"""

from __future__ import annotations

import pytest

from mtrremu.core import msrs
from mtrremu.core.errors import InvalidArgument, RejectedHostWrite
from mtrremu.core.vm import Vm
from mtrremu.testing.cases import ILLEGAL_MTRR_TYPES, LEGAL_MTRR_TYPES
from tests.helpers import ALL_STRATEGIES, GIB, make_vm, var_mask

ILLEGAL_PAT_TYPES = (2, 3, 8, 0xFF)
MAXPHYADDRS = (36, 40, 46)

DEFTYPE = 0x2FF
MTRRCAP = 0xFE
PAT = 0x277
PHYSBASE3 = 0x206
PHYSMASK3 = 0x207

#: The 11 fixed MSRs with their SDM names.
FIXED_NAMES = {
    0x250: "MTRRfix64K_00000",
    0x258: "MTRRfix16K_80000",
    0x259: "MTRRfix16K_A0000",
    0x268: "MTRRfix4K_C0000",
    0x269: "MTRRfix4K_C8000",
    0x26A: "MTRRfix4K_D0000",
    0x26B: "MTRRfix4K_D8000",
    0x26C: "MTRRfix4K_E0000",
    0x26D: "MTRRfix4K_E8000",
    0x26E: "MTRRfix4K_F0000",
    0x26F: "MTRRfix4K_F8000",
}
VAR_NAMES = {
    0x200 + 2 * pair + is_mask: f"MTRRphys{'Mask' if is_mask else 'Base'}{pair}"
    for pair in range(8)
    for is_mask in (0, 1)
}
ALL_WRITABLE = {DEFTYPE: "MTRRdefType", **FIXED_NAMES, **VAR_NAMES, PAT: "PAT"}
#: The name a rejected host write must give for each MSR.
NAMES = {**ALL_WRITABLE, MTRRCAP: "MTRRcap"}
UNKNOWN_INDICES = (0x210, 0x2F8, 0x12345)

#: A legal fixed MSR value holding every legal type: bytes 6 5 4 1 0 6 5 4 (byte 0 first).
FIXED_GOOD = int.from_bytes(bytes([6, 5, 4, 1, 0, 6, 5, 4]), "little")


def _good_value(msr: int, maxphyaddr: int = 40) -> int:
    """A legal, non-power-on value for ``msr`` (so "unchanged" is distinguishable from 0)."""
    if msr == DEFTYPE:
        return 0xC06  # E | FE | WB
    if msr == PAT:
        return 0x0007010600070406
    if msr in FIXED_NAMES:
        return FIXED_GOOD
    pair, is_mask = divmod(msr - 0x200, 2)
    if is_mask:
        return var_mask(GIB, maxphyaddr)
    return (pair + 1) * GIB | 4  # WT


def _seeded_vm(msr: int, maxphyaddr: int = 40, strategy: str = "fine-grained") -> Vm:
    """A VM whose ``msr`` (and its pair partner, for variable MSRs) holds a legal value."""
    vm = make_vm(strategy, guest_maxphyaddr=maxphyaddr)
    if msr in VAR_NAMES:
        base_msr = msr & ~1
        assert vm.write_msr(0, base_msr, _good_value(base_msr, maxphyaddr), host=True).gp is None
        assert (
            vm.write_msr(0, base_msr + 1, _good_value(base_msr + 1, maxphyaddr), host=True).gp
            is None
        )
    elif msr in ALL_WRITABLE:
        assert vm.write_msr(0, msr, _good_value(msr, maxphyaddr), host=True).gp is None
    return vm


def _state(vm: Vm) -> tuple[tuple[int, ...], int, int, list[int]]:
    vc = vm.vcpus[0]
    return vc.mtrr.snapshot(), vc.pat, vc.mtrr.version, list(vc.mtrr.order)


def _read(vm: Vm, msr: int) -> int:
    value = vm.read_msr(0, msr).value
    assert value is not None
    return value


def assert_guest_rejected(vm: Vm, msr: int, value: int) -> None:
    """A guest WRMSR of ``value`` is a #GP (reason given, counted once) and changes nothing."""
    before_value = _read(vm, msr)
    before = _state(vm)
    gp_before = vm.counters.guest_gp
    result = vm.write_msr(0, msr, value)
    assert isinstance(result.gp, str)
    assert result.gp != ""
    assert result.counters.guest_gp == 1
    assert vm.counters.guest_gp == gp_before + 1
    assert _read(vm, msr) == before_value
    assert _state(vm) == before


def assert_host_rejected(vm: Vm, msr: int, value: int, name: str) -> None:
    """A host write of ``value`` raises RejectedHostWrite naming the MSR; no #GP, no change."""
    before_value = _read(vm, msr)
    before = _state(vm)
    gp_before = vm.counters.guest_gp
    with pytest.raises(RejectedHostWrite) as caught:
        vm.write_msr(0, msr, value, host=True)
    assert name in str(caught.value)
    assert vm.counters.guest_gp == gp_before
    assert _read(vm, msr) == before_value
    assert _state(vm) == before


def assert_rejected(vm: Vm, msr: int, value: int, host: bool) -> None:
    """The guest or host write of ``value`` is rejected as that kind of write must be."""
    if host:
        assert_host_rejected(vm, msr, value, NAMES[msr])
    else:
        assert_guest_rejected(vm, msr, value)


def assert_accepted(vm: Vm, msr: int, value: int, host: bool) -> None:
    """The write is accepted and ``value`` reads back exactly (guest and host reads)."""
    mtrr = vm.vcpus[0].mtrr
    version, registers, order = mtrr.version, mtrr.registers(), list(mtrr.order)
    result = vm.write_msr(0, msr, value, host=host)
    assert result.gp is None
    assert result.counters.guest_gp == 0
    assert vm.read_msr(0, msr).value == value
    assert vm.read_msr(0, msr, host=True).value == value
    # The version (what derived maps are cached by) moves exactly when what types depend on
    # moves: the registers as read back, or the variable list order.
    changed = (mtrr.registers(), mtrr.order) != (registers, order)
    assert mtrr.version == version + changed


# -- legal types -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("mtype", LEGAL_MTRR_TYPES)
def test_deftype_accepts_legal_type(mtype: int, host: bool) -> None:
    assert_accepted(make_vm(), DEFTYPE, msrs.DEFTYPE_E | mtype, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("mtype", ILLEGAL_MTRR_TYPES)
def test_deftype_illegal_type_is_rejected(mtype: int, host: bool) -> None:
    assert_rejected(_seeded_vm(DEFTYPE), DEFTYPE, msrs.DEFTYPE_E | mtype, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("mtype", (*LEGAL_MTRR_TYPES, 7))
def test_pat_accepts_mtrr_types_and_uc_minus(mtype: int, host: bool) -> None:
    value = int.from_bytes(bytes([mtype] * 8), "little")
    assert_accepted(make_vm(), PAT, value, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("position", range(8))
@pytest.mark.parametrize("bad", ILLEGAL_PAT_TYPES)
def test_pat_illegal_byte_is_rejected(bad: int, position: int, host: bool) -> None:
    good = _good_value(PAT)
    value = (good & ~(0xFF << (8 * position))) | (bad << (8 * position))
    assert_rejected(_seeded_vm(PAT), PAT, value, host)


# -- MTRRdefType reserved bits -----------------------------------------------------------------

DEFTYPE_RESERVED_BITS = (8, 9, 12, 13, 16, 31, 32, 40, 52, 63)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("bit", DEFTYPE_RESERVED_BITS)
def test_deftype_reserved_bit_is_rejected(bit: int, host: bool) -> None:
    assert_rejected(_seeded_vm(DEFTYPE), DEFTYPE, 0xC06 | (1 << bit), host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("value", [0x0, 0x400, 0x800, 0xC00, 0xC06, 0x405])
def test_deftype_fe_and_e_bits_are_writable(value: int, host: bool) -> None:
    assert_accepted(make_vm(), DEFTYPE, value, host)


# -- fixed MSRs: every byte must hold a legal type ----------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("position", range(8))
@pytest.mark.parametrize("msr", list(FIXED_NAMES), ids=list(FIXED_NAMES.values()))
@pytest.mark.parametrize("bad", ILLEGAL_MTRR_TYPES)
def test_fixed_illegal_byte_is_rejected(bad: int, msr: int, position: int, host: bool) -> None:
    value = (FIXED_GOOD & ~(0xFF << (8 * position))) | (bad << (8 * position))
    assert_rejected(_seeded_vm(msr), msr, value, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("msr", list(FIXED_NAMES), ids=list(FIXED_NAMES.values()))
@pytest.mark.parametrize("mtype", LEGAL_MTRR_TYPES)
def test_fixed_accepts_legal_type_in_every_byte(mtype: int, msr: int, host: bool) -> None:
    assert_accepted(make_vm(), msr, int.from_bytes(bytes([mtype] * 8), "little"), host)


# -- PhysBase ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("bit", (8, 9, 10, 11))
def test_physbase_reserved_bit_is_rejected(bit: int, host: bool) -> None:
    value = 2 * GIB | 6 | (1 << bit)
    assert_rejected(_seeded_vm(PHYSBASE3), PHYSBASE3, value, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("mtype", ILLEGAL_MTRR_TYPES)
def test_physbase_illegal_type_is_rejected(mtype: int, host: bool) -> None:
    assert_rejected(_seeded_vm(PHYSBASE3), PHYSBASE3, 2 * GIB | mtype, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("mtype", LEGAL_MTRR_TYPES)
def test_physbase_accepts_legal_type(mtype: int, host: bool) -> None:
    assert_accepted(_seeded_vm(PHYSBASE3), PHYSBASE3, 2 * GIB | mtype, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_physbase_accepts_bit_below_maxphyaddr(maxphyaddr: int, host: bool) -> None:
    vm = _seeded_vm(PHYSBASE3, maxphyaddr)
    assert_accepted(vm, PHYSBASE3, (1 << (maxphyaddr - 1)) | 6, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("bit_above", (0, 1, 63), ids=["MAXPHYADDR", "MAXPHYADDR+1", "63"])
@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_physbase_bit_at_or_above_maxphyaddr_is_rejected(
    maxphyaddr: int, bit_above: int, host: bool
) -> None:
    bit = 63 if bit_above == 63 else maxphyaddr + bit_above
    vm = _seeded_vm(PHYSBASE3, maxphyaddr)
    assert_rejected(vm, PHYSBASE3, (1 << bit) | 6, host)


# -- PhysMask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("bit", range(11))
def test_physmask_reserved_low_bit_is_rejected(bit: int, host: bool) -> None:
    value = var_mask(GIB) | (1 << bit)
    assert_rejected(_seeded_vm(PHYSMASK3), PHYSMASK3, value, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_physmask_accepts_bit_below_maxphyaddr(maxphyaddr: int, host: bool) -> None:
    vm = _seeded_vm(PHYSMASK3, maxphyaddr)
    assert_accepted(vm, PHYSMASK3, (1 << (maxphyaddr - 1)) | msrs.PHYSMASK_VALID, host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("bit_above", (0, 1, 63), ids=["MAXPHYADDR", "MAXPHYADDR+1", "63"])
@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_physmask_bit_at_or_above_maxphyaddr_is_rejected(
    maxphyaddr: int, bit_above: int, host: bool
) -> None:
    bit = 63 if bit_above == 63 else maxphyaddr + bit_above
    vm = _seeded_vm(PHYSMASK3, maxphyaddr)
    assert_rejected(vm, PHYSMASK3, var_mask(GIB, maxphyaddr) | (1 << bit), host)


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("value", [0x0, 0x800, var_mask(GIB) & ~0x800, var_mask(GIB)])
def test_physmask_accepts_valid_bit_and_mask_bits(value: int, host: bool) -> None:
    assert_accepted(_seeded_vm(PHYSMASK3), PHYSMASK3, value, host)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_validity_rules_hold_in_every_strategy(strategy: str) -> None:
    vm = _seeded_vm(PHYSBASE3, 40, strategy)
    assert_guest_rejected(vm, PHYSBASE3, (1 << 40) | 6)
    assert_host_rejected(vm, PHYSBASE3, 2 * GIB | 0x100 | 6, "MTRRphysBase3")
    assert_guest_rejected(vm, DEFTYPE, 0xC02)
    assert_accepted(vm, PHYSBASE3, (1 << 39) | 6, host=False)


# -- mask read-back ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
@pytest.mark.parametrize("pair", (0, 3, 7))
def test_mask_reads_back_as_written_while_stored_with_high_bits(
    pair: int, maxphyaddr: int, host: bool
) -> None:
    vm = make_vm(guest_maxphyaddr=maxphyaddr)
    written = var_mask(GIB, maxphyaddr)
    assert vm.write_msr(0, 0x201 + 2 * pair, written, host=host).gp is None
    high = ((1 << 64) - 1) ^ ((1 << maxphyaddr) - 1)
    assert vm.vcpus[0].mtrr.masks[pair] == written | high
    assert vm.read_msr(0, 0x201 + 2 * pair).value == written
    assert vm.read_msr(0, 0x201 + 2 * pair, host=True).value == written


@pytest.mark.parametrize("maxphyaddr", MAXPHYADDRS)
def test_zero_mask_reads_back_zero_while_stored_with_high_bits(maxphyaddr: int) -> None:
    vm = _seeded_vm(PHYSMASK3, maxphyaddr)
    assert vm.write_msr(0, PHYSMASK3, 0).gp is None
    assert vm.vcpus[0].mtrr.masks[3] == ((1 << 64) - 1) ^ ((1 << maxphyaddr) - 1)
    assert vm.read_msr(0, PHYSMASK3).value == 0


# -- every MSR round-trips ---------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("msr", list(ALL_WRITABLE), ids=list(ALL_WRITABLE.values()))
def test_accepted_write_round_trips(msr: int, host: bool) -> None:
    assert_accepted(make_vm(), msr, _good_value(msr), host)


def test_every_mtrr_msr_keeps_its_own_value() -> None:
    vm = make_vm()
    written = {msr: _good_value(msr) for msr in ALL_WRITABLE}
    legal = bytes(LEGAL_MTRR_TYPES * 4)
    for slot, msr in enumerate(FIXED_NAMES):
        written[msr] = int.from_bytes(legal[slot % 5 : slot % 5 + 8], "little")
    for pair in range(8):
        written[0x201 + 2 * pair] = var_mask(GIB >> pair)
    for msr, value in written.items():
        assert vm.write_msr(0, msr, value).gp is None
    assert {msr: vm.read_msr(0, msr).value for msr in ALL_WRITABLE} == written


# -- MTRRcap -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
def test_mtrrcap_reads_0x508(host: bool) -> None:
    result = make_vm().read_msr(0, MTRRCAP, host=host)
    assert result.gp is None
    assert result.value == 0x508


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("value", [0x508, 0x0, 0x50A])
def test_mtrrcap_write_is_rejected(value: int, host: bool) -> None:
    vm = make_vm()
    assert_rejected(vm, MTRRCAP, value, host)
    assert _read(vm, MTRRCAP) == 0x508


# -- indices outside the table -----------------------------------------------------------------


@pytest.mark.parametrize("msr", UNKNOWN_INDICES, ids=[hex(m) for m in UNKNOWN_INDICES])
def test_unknown_index_write_is_guest_gp(msr: int) -> None:
    vm = make_vm()
    before = _state(vm)
    result = vm.write_msr(0, msr, 0)
    assert isinstance(result.gp, str)
    assert result.gp != ""
    assert result.counters.guest_gp == 1
    assert vm.counters.guest_gp == 1
    assert _state(vm) == before


@pytest.mark.parametrize("msr", UNKNOWN_INDICES, ids=[hex(m) for m in UNKNOWN_INDICES])
def test_unknown_index_write_is_host_error(msr: int) -> None:
    vm = make_vm()
    before = _state(vm)
    with pytest.raises(RejectedHostWrite) as caught:
        vm.write_msr(0, msr, 0, host=True)
    assert hex(msr) in str(caught.value)
    assert vm.counters.guest_gp == 0
    assert _state(vm) == before


@pytest.mark.parametrize("msr", UNKNOWN_INDICES, ids=[hex(m) for m in UNKNOWN_INDICES])
def test_unknown_index_read_is_guest_gp(msr: int) -> None:
    vm = make_vm()
    result = vm.read_msr(0, msr)
    assert isinstance(result.gp, str)
    assert result.gp != ""
    assert result.value is None
    assert result.counters.guest_gp == 1
    assert vm.counters.guest_gp == 1


@pytest.mark.parametrize("msr", UNKNOWN_INDICES, ids=[hex(m) for m in UNKNOWN_INDICES])
def test_unknown_index_read_is_host_error(msr: int) -> None:
    vm = make_vm()
    with pytest.raises(InvalidArgument):
        vm.read_msr(0, msr, host=True)
    assert vm.counters.guest_gp == 0


# -- values that do not fit in 64 bits ---------------------------------------------------------

OUT_OF_RANGE = (1 << 64, (1 << 64) + 6, 1 << 70, -1, -(1 << 63))


@pytest.mark.parametrize("host", [False, True], ids=["guest", "host"])
@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=[hex(v) for v in OUT_OF_RANGE])
@pytest.mark.parametrize("msr", [DEFTYPE, 0x250, PHYSBASE3, PHYSMASK3, PAT], ids=hex)
def test_value_outside_u64_is_invalid_argument(msr: int, value: int, host: bool) -> None:
    vm = _seeded_vm(msr)
    before_value = _read(vm, msr)
    before = _state(vm)
    with pytest.raises(InvalidArgument):
        vm.write_msr(0, msr, value, host=host)
    assert vm.counters.guest_gp == 0
    assert _read(vm, msr) == before_value
    assert _state(vm) == before
