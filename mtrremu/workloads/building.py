"""Building blocks shared by the workloads.

:class:`TraceBuilder` records operations in order and follows each vCPU's CR0 and MTRR values
as the guest sees them, so steps like "set CD" or "write only the MSRs that change" produce
exactly the writes the firmware or kernel would. Each block below names the code it stands for.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import (
    Access,
    Burst,
    FaultRange,
    Init,
    Item,
    VcpuOp,
    WriteCr0,
    WriteMsr,
)
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import KIB, MIB, PAGE_SHIFT, PAGE_SIZE
from mtrremu.workloads.trace import Trace

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


#: Linux's running CR0 (PE, MP, ET, NE, WP, AM, PG) and its PAT (WB, WC, UC-, UC, WB, WP, UC-, WT).
LINUX_CR0 = 0x80050033
LINUX_PAT = 0x0407050600070106


def fixed_value(mtype: int) -> int:
    """A fixed MSR holding ``mtype`` in all eight ranges."""
    return int.from_bytes(bytes([mtype] * 8), "little")


WB_BYTES = fixed_value(MemType.WB)
WP_BYTES = fixed_value(MemType.WP)


def var_mask(size: int, maxphyaddr: int) -> int:
    """A valid PhysMask for a power-of-two ``size``."""
    return (~(size - 1) & ((1 << maxphyaddr) - 1) & ~0xFFF) | msrs.PHYSMASK_VALID


def power_of_two_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into naturally aligned power-of-two blocks, lowest first (how
    firmware covers a hole with variable MTRRs)."""
    blocks = []
    while start < end:
        size = start & -start if start else 1 << (end.bit_length() - 1)
        while start + size > end:
            size >>= 1
        blocks.append((start, size))
        start += size
    return blocks


@dataclass
class TraceBuilder:
    """Records a trace and follows what each vCPU's registers hold."""

    config: VmConfig
    seed: int = 1
    items: list[Item] = field(init=False, default_factory=list)
    cr0: list[int] = field(init=False)
    mtrrs: list[dict[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.cr0 = [cr0.RESET_VALUE] * self.config.vcpus
        self.mtrrs = [dict.fromkeys(msrs.MTRR_MSRS, 0) for _ in range(self.config.vcpus)]
        self._random = random.Random(self.seed)

    @property
    def vcpus(self) -> range:
        return range(self.config.vcpus)

    @property
    def maxphyaddr(self) -> int:
        return self.config.guest_maxphyaddr

    # -- single operations: return them so callers can put them in bursts ----------------

    def wrmsr(self, vcpu: int, msr: int, value: int, *, host: bool = False) -> WriteMsr:
        if msr in self.mtrrs[vcpu]:
            self.mtrrs[vcpu][msr] = value
        return WriteMsr(vcpu, msr, value, host)

    def write_cr0(self, vcpu: int, value: int, *, host: bool = False) -> WriteCr0:
        self.cr0[vcpu] = value
        return WriteCr0(vcpu, value, host)

    def set_cd(self, vcpu: int, on: bool) -> list[VcpuOp]:
        """A guest CR0 write setting or clearing CD, keeping the other bits (NW cleared with
        CD as firmware does); nothing if CD is already so."""
        current = self.cr0[vcpu]
        if bool(current & cr0.CD) == on:
            return []
        value = (current | cr0.CD) & ~cr0.NW if on else current & ~(cr0.CD | cr0.NW)
        return [self.write_cr0(vcpu, value)]

    def init(self, vcpu: int) -> Init:
        self.cr0[vcpu] = cr0.init_value(self.cr0[vcpu])
        return Init(vcpu)

    # -- recording ---------------------------------------------------------------------

    def add(self, ops: Iterable[Item]) -> None:
        self.items.extend(ops)

    def burst(self, lanes: Mapping[int, Sequence[VcpuOp]]) -> None:
        """vCPUs acting at the same time (see :mod:`mtrremu.core.burst`); the round order comes
        from the builder's seed, so a whole trace is reproducible from its seed."""
        kept = tuple((vcpu, tuple(ops)) for vcpu, ops in lanes.items() if ops)
        if kept:
            self.items.append(Burst(kept, self._random.randrange(1 << 32)))

    def shuffle(self, order: list[int]) -> None:
        """A seeded order (who takes a lock first), reproducible from the builder's seed."""
        self._random.shuffle(order)

    @staticmethod
    def touches(vcpu: int, start: int, size: int) -> list[VcpuOp]:
        """The guest touching every page of ``[start, start+size)`` (gpas; widened to whole
        pages), as operations to record or put in a burst lane."""
        first, end = start >> PAGE_SHIFT, -(-(start + size) >> PAGE_SHIFT)
        if end <= first:
            return []
        start_gpa, end_gpa = first << PAGE_SHIFT, end << PAGE_SHIFT
        if end == first + 1:
            return [Access(vcpu, start_gpa)]
        return [FaultRange(vcpu, start_gpa, end_gpa)]

    @staticmethod
    def pages(vcpu: int, *gpas: int) -> list[VcpuOp]:
        """The guest touching the page of each gpa, in order (an address outside every memslot
        is an MMIO access)."""
        return [Access(vcpu, gpa & ~(PAGE_SIZE - 1)) for gpa in gpas]

    def touch(self, vcpu: int, start: int, size: int) -> None:
        """Record :meth:`touches`."""
        self.add(self.touches(vcpu, start, size))

    def trace(self, workload: str, params: DataclassInstance) -> Trace:
        """The recorded trace of ``workload`` built with ``params`` (a parameter dataclass)."""
        described: dict[str, Any] = {"seed": self.seed, **asdict(params)}
        return Trace(workload, self.config, tuple(self.items), described)


# -- the VMM -------------------------------------------------------------------------------


def qemu_reset_push(b: TraceBuilder) -> None:
    """QEMU's ``kvm_arch_put_registers`` at ``KVM_PUT_RESET_STATE`` on every vCPU [qemu
    target/i386/kvm/kvm.c]: the sregs first (``kvm_put_sregs2``), which load the reset CR0
    0x60000010 (CD=1, NW=1) the vCPU already holds, so no CR0 write is recorded; then
    ``kvm_put_msrs``: the 28 MTRR MSRs, zero, host-initiated, defType first."""
    for vcpu in b.vcpus:
        # msrs.MTRR_MSRS is QEMU's order too: defType, the 11 fixed MSRs, the 8 pairs.
        b.add(b.wrmsr(vcpu, msr, 0, host=True) for msr in msrs.MTRR_MSRS)


def qemu_put_registers(
    b: TraceBuilder, vcpu: int, cr0_value: int, mtrrs: Mapping[int, int]
) -> list[VcpuOp]:
    """QEMU's ``kvm_arch_put_registers`` on one vCPU at ``KVM_PUT_FULL_STATE`` (an incoming
    migration or a snapshot restore) [qemu target/i386/kvm/kvm.c]: the sregs come first
    (``kvm_put_sregs2``; its comment: "must be before kvm_put_nested_state"), so CR0 already
    holds ``cr0_value`` when ``kvm_put_msrs`` writes the MTRRs afterwards, host-initiated, in
    its order: defType first, the 11 fixed MSRs, then each pair's base and mask (a restored
    guest's defType has E set, so every MSR after it lands with MTRRs enabled)."""
    ops: list[VcpuOp] = [b.write_cr0(vcpu, cr0_value, host=True)]
    ops += [b.wrmsr(vcpu, msr, mtrrs[msr], host=True) for msr in msrs.MTRR_MSRS]
    return ops


def var_pairs(
    b: TraceBuilder,
    vcpu: int,
    ranges: Iterable[tuple[int, int]],
    *,
    first_pair: int = 0,
    host: bool = False,
) -> list[VcpuOp]:
    """Variable pairs from ``first_pair`` on covering power-of-two ``(base, size)`` ranges,
    base then mask; the bases carry type 0 (UC)."""
    ops: list[VcpuOp] = []
    for pair, (base, size) in enumerate(ranges, start=first_pair):
        ops += [
            b.wrmsr(vcpu, msrs.PHYSBASE0 + 2 * pair, base, host=host),
            b.wrmsr(vcpu, msrs.PHYSBASE0 + 2 * pair + 1, var_mask(size, b.maxphyaddr), host=host),
        ]
    return ops


def mtrr_change(
    b: TraceBuilder,
    vcpu: int,
    writes: Iterable[tuple[int, int]],
    deftype: int,
    *,
    clear: int = msrs.DEFTYPE_E | msrs.DEFTYPE_FE | msrs.DEFTYPE_TYPE_MASK,
) -> list[VcpuOp]:
    """The sequence every MTRR writer wraps its writes in (SDM 11.11.8): CD 0→1 · defType with
    the ``clear`` bits cleared · the writes · defType ← ``deftype`` · CD 1→0. By default E, FE
    and the default type are cleared, as Linux's ``mtrr_disable`` does (``deftype_lo &
    MTRR_DEF_TYPE_DISABLE`` [linux arch/x86/kernel/cpu/mtrr/generic.c]); edk2's MtrrLib clears
    only E."""
    disabled = b.mtrrs[vcpu][msrs.DEFTYPE] & ~clear
    ops = [*b.set_cd(vcpu, True), b.wrmsr(vcpu, msrs.DEFTYPE, disabled)]
    ops += [b.wrmsr(vcpu, msr, value) for msr, value in writes]
    ops += [b.wrmsr(vcpu, msrs.DEFTYPE, deftype), *b.set_cd(vcpu, False)]
    return ops


# -- Linux ---------------------------------------------------------------------------------


def linux_cr0(b: TraceBuilder, vcpu: int) -> list[VcpuOp]:
    """The 64-bit entry (``head_64.S``, the AP trampoline) loading Linux's CR0, CD=0: a guest
    CD 1→0 for a CPU that arrives with CD=1."""
    return [b.write_cr0(vcpu, LINUX_CR0)] if b.cr0[vcpu] != LINUX_CR0 else []


def linux_cache_cpu_init(b: TraceBuilder, vcpu: int, saved: Mapping[int, int]) -> list[VcpuOp]:
    """``cache_cpu_init`` on one CPU: CD 0→1 · defType ← 0 · range MSRs rewritten where they
    differ from the boot CPU's saved state · defType ← saved · CD 1→0 · PAT ← Linux's."""
    changed = [
        (msr, saved[msr])
        for msr in (*msrs.FIXED_MSRS, *msrs.VAR_MSRS)
        if b.mtrrs[vcpu][msr] != saved[msr]
    ]
    ops = mtrr_change(b, vcpu, changed, saved[msrs.DEFTYPE])
    return [*ops, b.wrmsr(vcpu, msrs.PAT, LINUX_PAT)]


@dataclass(frozen=True)
class LinuxParams:
    """Linux's boot on top of any firmware (all sizes and addresses in bytes)."""

    #: Where the kernel image is loaded and how much of it the BSP touches.
    kernel_base: int = 16 * MIB
    kernel_size: int = 32 * MIB
    #: Per-CPU areas and stacks each CPU touches during SMP bring-up.
    percpu_size: int = 2 * MIB
    #: Share of RAM the running workload touches, spread over the CPUs.
    touch_fraction: float = 0.25
    #: Order in which CPUs take ``cache_aps_init``'s spinlock: "ascending" or "seeded".
    aps_init_order: str = "ascending"
    #: The real-mode trampoline the APs start in: ``reserve_real_mode`` takes it top-down below
    #: the EBDA (a few pages; the exact place depends on the e820 map).
    trampoline: int = 0x99000
    trampoline_size: int = 24 * KIB
    #: Bytes of the framebuffer fbcon paints when it takes over (the whole visible screen:
    #: 1024x768 at 32 bpp, bochs-drm's default mode).
    framebuffer_bytes: int = 3 * MIB


@dataclass(frozen=True)
class Handover:
    """What the firmware hands Linux besides its registers.

    ``efi``: booted through UEFI (no legacy table scans); ``rsdp``: a BIOS boot's RSDP, which
    the decompressor's scan of 0xE0000-0xFFFFF stops at; ``vram``: the std VGA's BAR0 as the
    firmware assigned it (``None``: no VGA).
    """

    efi: bool
    rsdp: int = 0xF5000
    vram: int | None = None


#: The legacy areas Linux reads: the EBDA's page, the option-ROM area, the system ROM.
EBDA_PAGE = 0x9F000
ROM_AREA = (0xC0000, 0xF0000)
SYSTEM_ROM = (0xF0000, 0x100000)
#: The legacy VGA text buffer (QEMU MMIO in text mode) and the local APIC (MMIO).
VGA_TEXT = 0xB8000
LOCAL_APIC = 0xFEE00000


def _span(bounds: tuple[int, int]) -> tuple[int, int]:
    """``(start, size)`` of ``[start, end)``."""
    return bounds[0], bounds[1] - bounds[0]


def _ram_slices(config: VmConfig, fraction: float) -> list[tuple[int, int]]:
    """``fraction`` of each RAM slot, from its start, 2 MiB aligned: ``(gpa, size)``."""
    slices = []
    for slot in config.sorted_memslots():
        if slot.kind.value != "ram":
            continue
        size = int((slot.pages << PAGE_SHIFT) * fraction) & ~(2 * MIB - 1)
        if size:
            slices.append((slot.base_gfn << PAGE_SHIFT, size))
    return slices


def linux_boot(b: TraceBuilder, params: LinuxParams, handover: Handover) -> None:
    """Linux from the firmware handover to a running workload [linux arch/x86/boot/compressed,
    arch/x86/kernel/setup.c ``setup_arch``, init/main.c, arch/x86/kernel/smpboot.c].

    * Entry: the BSP's 64-bit entry writes its own CR0 (CD=0): a CD 1→0 if it came with CD=1.
    * The kernel image, loaded and decompressed by the BSP. A BIOS boot's decompressor scans
      the EBDA and 0xE0000-0xFFFFF for the RSDP (``get_rsdp_addr``); UEFI hands it over.
    * ``setup_arch`` before the cache init: ``dmi_setup`` reads all of 0xF0000-0xFFFFF (BIOS
      boot only) and ``probe_roms`` reads a signature every 2 KiB of 0xC0000-0xEFFFF.
    * BSP ``cache_bp_init`` → ``cache_cpu_init`` (2 zap events under either rule set), PAT.
    * After it: ``find_smp_config`` scans page 0, the EBDA and 0xF0000-0xFFFFF; the BSP
      copies the real-mode trampoline below 1 MiB; vgacon writes the text buffer (BIOS boot).
    * SMP bring-up: INIT (CD kept), the trampoline, its CR0 write (CD=0; a flip only for an AP
      still at CD=1); each CPU touches its per-CPU area and stack.
    * ``cache_aps_init``: every CPU, BSP included, runs ``cache_cpu_init`` once more; the CD=1
      windows are serialised by ``cache_disable_lock`` (2 zap events each).
    * Initcalls: fbcon paints the framebuffer (efifb/simpledrm, or bochs-drm).
    * The workload touches its share of RAM, split over the CPUs.
    """
    bsp = 0
    b.add(linux_cr0(b, bsp))
    b.touch(bsp, params.kernel_base, params.kernel_size)
    if not handover.efi:
        b.add(b.pages(bsp, EBDA_PAGE))
        b.touch(bsp, 0xE0000, handover.rsdp + 16 - 0xE0000)
        b.touch(bsp, *_span(SYSTEM_ROM))
    b.touch(bsp, *_span(ROM_AREA))
    saved = dict(b.mtrrs[bsp])
    b.add(linux_cache_cpu_init(b, bsp, saved))
    b.add(b.pages(bsp, 0, EBDA_PAGE))
    b.touch(bsp, *_span(SYSTEM_ROM))
    b.touch(bsp, params.trampoline, params.trampoline_size)
    if not handover.efi:
        b.add(b.pages(bsp, VGA_TEXT))
    percpu = params.kernel_base + params.kernel_size
    for ap in b.vcpus:
        if ap == bsp:
            continue
        trampoline = b.touches(ap, params.trampoline, params.trampoline_size)
        b.add([b.init(ap), *trampoline, *linux_cr0(b, ap)])
    for cpu in b.vcpus:
        b.touch(cpu, percpu + cpu * params.percpu_size, params.percpu_size)
    order = list(b.vcpus)
    if params.aps_init_order == "seeded":
        b.shuffle(order)
    for cpu in order:
        b.add(linux_cache_cpu_init(b, cpu, saved))
    if handover.vram is not None:
        b.touch(bsp, handover.vram, params.framebuffer_bytes)
    slices = _ram_slices(b.config, params.touch_fraction)
    for index, (start, size) in enumerate(slices):
        per_cpu = (size // len(b.vcpus)) & ~(2 * MIB - 1) or size
        for cpu in b.vcpus:
            offset = cpu * per_cpu
            if offset >= size:
                break
            b.touch((cpu + index) % len(b.vcpus), start + offset, min(per_cpu, size - offset))
