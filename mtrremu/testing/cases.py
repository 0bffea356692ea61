"""Guest scenarios shared by our own tests and the conformance suite
(:mod:`mtrremu.testing.conformance`): MTRR programming shortcuts, the cells of the seed patch's
two tables (patch 10: the CD-toggle zap when MTRRs are honoured) and guest MSR writes KVM
refuses with a #GP.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrremu.core import cr0, msrs
from mtrremu.core.config import Memslot, MemslotKind
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import GIB, KIB, MIB, PAGE_SHIFT, ZAP_ALL, GfnRange
from mtrremu.core.vm import Vm
from mtrremu.workloads import building

CD0 = cr0.ET | cr0.PE
CD1 = cr0.ET | cr0.PE | cr0.CD

FIXED_AREA = GfnRange(0, msrs.FIXED_AREA_END_GPA >> PAGE_SHIFT)
UC_HOLE = GfnRange((3 * GIB) >> PAGE_SHIFT, (4 * GIB) >> PAGE_SHIFT)
WT_RANGE = GfnRange((5 * GIB) >> PAGE_SHIFT, (5 * GIB + 512 * MIB) >> PAGE_SHIFT)
NOTHING: tuple[GfnRange, ...] = ()
EVERYTHING = (ZAP_ALL,)


def var_mask(size: int, maxphyaddr: int = 40) -> int:
    """A valid PhysMask value for a power-of-two ``size`` (MAXPHYADDR 40, the default VM's)."""
    return building.var_mask(size, maxphyaddr)


def q35_slots(ram_gib: int = 4) -> tuple[Memslot, ...]:
    """QEMU q35-like layout: RAM below 640 KiB, [1 MiB, 2 GiB), the rest above 4 GiB."""
    low = min(ram_gib, 2) * GIB
    slots = [Memslot.from_bytes(0, 640 * KIB, name="low"), Memslot.from_bytes(MIB, low - MIB)]
    if ram_gib > 2:
        slots.append(Memslot.from_bytes(4 * GIB, (ram_gib - 2) * GIB, name="high"))
    return tuple(slots)


#: RAM in three slots around a device BAR: low RAM, RAM to 2 GiB, a 16 MiB device slot at
#: 0xE0000000, 4 GiB above 4 GiB (random operation sequences run on it).
MIXED_SLOTS = (
    Memslot.from_bytes(0, 640 * KIB),
    Memslot.from_bytes(MIB, 2 * GIB - MIB),
    Memslot.from_bytes(0xE0000000, 16 * MIB, MemslotKind.DEVICE),
    Memslot.from_bytes(4 * GIB, 4 * GIB),
)


def set_var(  # noqa: PLR0917 (reads like the MSR pair it programs)
    vm: Vm, vcpu: int, pair: int, base: int, size: int, mtype: int, host: bool = True
) -> None:
    """Program a variable pair: base (with type) then mask, as firmware does."""
    maxphy = vm.config.guest_maxphyaddr
    assert vm.write_msr(vcpu, msrs.PHYSBASE0 + 2 * pair, base | mtype, host=host).gp is None
    assert (
        vm.write_msr(vcpu, msrs.PHYSBASE0 + 2 * pair + 1, var_mask(size, maxphy), host=host).gp
        is None
    )


def set_fixed_all(vm: Vm, vcpu: int, mtype: int, host: bool = True) -> None:
    value = building.fixed_value(mtype)
    for msr in msrs.FIXED_MSRS:
        assert vm.write_msr(vcpu, msr, value, host=host).gp is None


def set_deftype(vm: Vm, vcpu: int, value: int, host: bool = True) -> None:
    assert vm.write_msr(vcpu, msrs.DEFTYPE, value, host=host).gp is None


# -- the seed patch's tables ------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell: the MTRR setup, the guest's CPUID and quirk, the toggle direction."""

    quirk: bool
    mtrrs: str  # "enabled-wb", "enabled-wb-fixed-wb", "enabled-uc", "disabled"
    feature_mtrr: bool
    to_cd: int  # the CD value the guest writes

    @property
    def id(self) -> str:
        quirk = "quirk-on" if self.quirk else "quirk-off"
        feature = "" if self.feature_mtrr else "-no-feature-mtrr"
        return f"{quirk}-{self.mtrrs}{feature}-cd{1 - self.to_cd}to{self.to_cd}"


def program(vm: Vm, cell: Cell) -> None:
    """Host-initiated MTRR setup on vCPU 0 (host writes at CD=1 never zap): WB fixed ranges
    (UC at [0xA0000, 0xC0000) unless the cell's fixed ranges are all WB), WB over [0, 8 GiB),
    UC over [3 GiB, 4 GiB), WT over [5 GiB, 5.5 GiB), and the cell's MTRRdefType."""
    fixed_type = MemType.WB if cell.mtrrs == "enabled-wb-fixed-wb" else MemType.UC
    set_fixed_all(vm, 0, MemType.WB)
    if fixed_type is not MemType.WB:
        assert vm.write_msr(0, msrs.FIX16K_A0000, 0, host=True).gp is None
    set_var(vm, 0, 0, 0, 8 * GIB, MemType.WB)
    set_var(vm, 0, 1, 3 * GIB, GIB, MemType.UC)
    set_var(vm, 0, 2, 5 * GIB, 512 * MIB, MemType.WT)
    deftype = {
        "enabled-wb": 0xC06,
        "enabled-wb-fixed-wb": 0xC06,
        "enabled-uc": 0xC00,
        "disabled": 0x006,
    }[cell.mtrrs]
    set_deftype(vm, 0, deftype)


def expected_ranges(cell: Cell) -> tuple[GfnRange, ...]:
    """What the seed patch (``fine-grained``) zaps for the cell's toggle."""
    if not cell.quirk:
        return EVERYTHING  # CD=1 is UC+IPAT: never the MTRR type
    if cell.mtrrs == "disabled":
        return EVERYTHING if cell.feature_mtrr else NOTHING
    if cell.mtrrs == "enabled-uc":
        return EVERYTHING
    # Default WB == the CD=1 type: only ranges of another type, the fixed area first, then
    # the variable ranges in KVM's list order (descending base: WT at 5 GiB, then UC at 3 GiB).
    var = (WT_RANGE, UC_HOLE)
    return var if cell.mtrrs == "enabled-wb-fixed-wb" else (FIXED_AREA, *var)


#: The 20 cells: quirk on/off x five MTRR setups x both toggle directions.
CELLS = [
    Cell(quirk, mtrrs, feature, to_cd)
    for quirk in (True, False)
    for mtrrs, feature in (
        ("enabled-wb", True),
        ("enabled-wb-fixed-wb", True),
        ("enabled-uc", True),
        ("disabled", True),
        ("disabled", False),
    )
    for to_cd in (0, 1)
]


# -- guest writes KVM refuses ---------------------------------------------------------------

LEGAL_MTRR_TYPES = (0, 1, 4, 5, 6)
ILLEGAL_MTRR_TYPES = (2, 3, 7, 8, 0xFF)


@dataclass(frozen=True)
class InvalidWrite:
    """A guest WRMSR KVM answers with #GP (nothing changes, nothing is zapped)."""

    id: str
    msr: int
    value: int


#: One case per validity rule of docs/semantics.md#msrs-validity-and-cr0 (MAXPHYADDR 40).
INVALID_WRITES = (
    *(InvalidWrite(f"deftype-type-{t}", msrs.DEFTYPE, 0xC00 | t) for t in ILLEGAL_MTRR_TYPES),
    InvalidWrite("deftype-reserved-bit-9", msrs.DEFTYPE, 0xC06 | 1 << 9),
    InvalidWrite("deftype-reserved-bit-12", msrs.DEFTYPE, 0xC06 | 1 << 12),
    InvalidWrite("fixed-byte-type-2", msrs.FIX16K_A0000, 0x0606060606060602),
    InvalidWrite("fixed-high-byte-type-7", msrs.FIXED_MSRS[0], 0x0706060606060606),
    InvalidWrite("physbase-type-3", msrs.PHYSBASE0, GIB | 3),
    InvalidWrite("physbase-reserved-bits", msrs.PHYSBASE0, GIB | 0x100 | 6),
    InvalidWrite("physbase-beyond-maxphyaddr", msrs.PHYSBASE0, (1 << 40) | 6),
    InvalidWrite("physmask-reserved-bits", msrs.PHYSBASE0 + 1, var_mask(GIB) | 1),
    InvalidWrite("physmask-beyond-maxphyaddr", msrs.PHYSBASE0 + 1, var_mask(GIB) | 1 << 41),
    InvalidWrite("mtrrcap-read-only", msrs.MTRRCAP, 0),
    InvalidWrite("unknown-msr-0x2f8", 0x2F8, 0),
)
