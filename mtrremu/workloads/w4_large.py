"""W4: a large VM — pre-populated RAM, a whole-VM MTRR event, then every vCPU re-touching its
working set [linux arch/x86/kernel/cpu/cacheinfo.c ``cache_aps_init``; mtrr/generic.c; qemu
target/i386/kvm/kvm.c ``kvm_arch_put_registers``, ``kvm_put_msrs``].

The VM starts as a running Linux guest restored by its VMM (QEMU's incoming migration or
snapshot load, ``KVM_PUT_FULL_STATE``): ``kvm_arch_put_registers`` puts the sregs first, so
every vCPU gets Linux's running CR0 (CD=0, a host write: no zap) *before* ``kvm_put_msrs``
pushes its MTRRs, defType (E=1) first, then the 11 fixed MSRs and the 8 pairs. Every vCPU has
touched its share of RAM (the EPT is fully populated at ``max_mapping_level``). Then ``event``:

* ``cache_aps_init`` (default): every CPU runs ``cache_cpu_init`` (CD 0→1, defType ← 0,
  defType ← saved, CD 1→0), one at a time under a spinlock;
* ``mtrr_add``: a runtime ``mtrr_add`` of a WC range (``/proc/mtrr``) that every CPU applies
  in turn: disable (CD 0→1, defType ← 0), write the pair, enable (defType, CD 1→0).

Finally every vCPU touches its working set again (the refaults).

Zap events, N vCPUs (predicted from the rules in docs/semantics.md):

* the restore: 28N under either rule set — the defType write (E=1) zaps all, and since it comes
  first and CD is already 0, each of the 11 fixed writes (E=1, FE=1) zaps its span and each of
  the 16 pair writes zaps its pair's span;
* the event: 2N under either rule set (``cache_aps_init``: defType pairs / CD flips;
  ``mtrr_add``: Base1 adds the pair's base and mask writes only if E=1 — they come after the
  disabling defType write, so none).

So 30N under Base1 and Base2 alike.

Sizes from the issue: 416 vCPUs on 1.5 TiB at 2 MiB leaves, and on 12 TiB at 1 GiB leaves,
``guest_maxphyaddr`` 46.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import VcpuOp
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import GIB, MIB, PAGE_SHIFT, TIB, Level
from mtrremu.workloads.building import (
    LINUX_CR0,
    WB_BYTES,
    WP_BYTES,
    TraceBuilder,
    linux_cache_cpu_init,
    mtrr_change,
    qemu_put_registers,
    var_mask,
)
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace


@dataclass(frozen=True)
class Params:
    vcpus: int = 416
    ram: int = 3 * TIB // 2
    #: Largest leaf: "2M" (the 1.5 TiB case) or "1G" (the 12 TiB case).
    max_mapping_level: str = "2M"
    guest_maxphyaddr: int = 46
    #: "cache_aps_init" or "mtrr_add".
    event: str = "cache_aps_init"
    #: The WC range an ``mtrr_add`` event covers (a framebuffer-like BAR in the PCI hole).
    mtrr_add_base: int = 0xE0000000
    mtrr_add_size: int = 256 << 20
    #: Share of RAM each vCPU's working set re-touches afterwards.
    working_set: float = 1.0


def booted_table(maxphyaddr: int) -> dict[int, int]:
    """The MTRRs of a booted q35 guest: fixed WB (VGA UC, ROMs WP), UC over [2 GiB, 4 GiB)."""
    table = dict.fromkeys(msrs.MTRR_MSRS, 0)
    table.update(dict.fromkeys(msrs.FIXED_MSRS, WB_BYTES))
    table[msrs.FIX16K_A0000] = 0
    table.update(dict.fromkeys(msrs.FIXED_MSRS[3:], WP_BYTES))
    table[msrs.PHYSBASE0] = 0x80000000
    table[msrs.PHYSBASE0 + 1] = var_mask(2 * GIB, maxphyaddr)
    table[msrs.DEFTYPE] = 0xC06
    return table


def restore_running(b: TraceBuilder, table: dict[int, int]) -> None:
    """The VMM restoring a running guest on every vCPU (:func:`qemu_put_registers`): Linux's
    CR0 first (CD=0), then the MTRRs, defType first."""
    for vcpu in b.vcpus:
        b.add(qemu_put_registers(b, vcpu, LINUX_CR0, table))


#: Below 1 MiB, only [0, 640 KiB) is usable RAM in a PC's e820 map.
LEGACY_AREA_START, LEGACY_AREA_END = 0xA0000, 0x100000


def ram_shares(b: TraceBuilder, fraction: float) -> list[tuple[int, int, int]]:
    """Each vCPU's ``(vcpu, gpa, size)`` shares of ``fraction`` of every RAM slot (``ram-*``;
    not the flash or a device's RAM). The legacy area [0xA0000, 1 MiB) is left out even where a
    slot holds RAM there: the firmware's e820 map does not offer it to the kernel as usable
    memory (option ROMs and the BIOS live there)."""
    shares = []
    for slot in b.config.sorted_memslots():
        if not slot.name.startswith("ram"):
            continue
        start = slot.base_gfn << PAGE_SHIFT
        end = slot.end_gfn << PAGE_SHIFT
        if LEGACY_AREA_START <= start < LEGACY_AREA_END:
            start = LEGACY_AREA_END
        size = int((end - start) * fraction) & ~(2 * MIB - 1)
        per = max(size // len(b.vcpus) & ~(2 * MIB - 1), 2 * MIB)
        offset = 0
        for vcpu in b.vcpus:
            if offset >= size:
                break
            shares.append((vcpu, start + offset, min(per, size - offset)))
            offset += per
    return shares


def mtrr_add_on(
    b: TraceBuilder, vcpu: int, pair: int, *, base: int, mask: int, mtype: int
) -> list[VcpuOp]:
    """``set_mtrr`` on one CPU: disable caches and MTRRs, write the pair (a zero mask: only
    the mask, as ``mtrr_del`` does), enable."""
    writes = [(msrs.PHYSBASE0 + 2 * pair, base | mtype)] if mask else []
    writes.append((msrs.PHYSBASE0 + 2 * pair + 1, mask))
    return mtrr_change(b, vcpu, writes, b.mtrrs[vcpu][msrs.DEFTYPE])


def build(params: Params, seed: int = 1) -> Trace:
    if params.event not in ("cache_aps_init", "mtrr_add"):
        raise ValueError(f"unknown event {params.event!r}")
    config = VmConfig(
        vcpus=params.vcpus,
        noncoherent_dma=1,
        guest_maxphyaddr=params.guest_maxphyaddr,
        memslots=q35(params.ram),
        max_mapping_level=Level.parse(params.max_mapping_level),
    )
    b = TraceBuilder(config, seed)
    table = booted_table(config.guest_maxphyaddr)
    restore_running(b, table)
    shares = ram_shares(b, 1.0)
    for vcpu, start, size in shares:
        b.touch(vcpu, start, size)
    if params.event == "cache_aps_init":
        for vcpu in b.vcpus:
            b.add(linux_cache_cpu_init(b, vcpu, table))
    else:
        mask = var_mask(params.mtrr_add_size, config.guest_maxphyaddr)
        for vcpu in b.vcpus:
            b.add(mtrr_add_on(b, vcpu, 1, base=params.mtrr_add_base, mask=mask, mtype=MemType.WC))
    for vcpu, start, size in ram_shares(b, params.working_set):
        b.touch(vcpu, start, size)
    return b.trace("W4", params)
