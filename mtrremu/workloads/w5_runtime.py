"""W5: a runtime ``mtrr_add`` then ``mtrr_del`` of a WC range over a device BAR
[linux arch/x86/kernel/cpu/mtrr/mtrr.c ``set_mtrr``, generic.c ``generic_set_mtrr``; qemu
target/i386/kvm/kvm.c ``kvm_arch_put_registers``].

A running guest (restored as in W4: CR0 first, CD=0, then its MTRRs, defType first) writes
``/proc/mtrr``: every CPU in turn disables caches and MTRRs (CD 0→1, defType ← 0), writes the
changed pair (``mtrr_add``: base then mask; ``mtrr_del``: PHYSMASK ← 0 only), and enables them
again (defType, CD 1→0). Variants:

* ``a``: a BAR with no RAM behind it inside the UC PCI hole — WC inside UC stays UC, so no
  memory type changes at all: every zap is pure cost;
* ``b``: a 32 GiB RAM-typed BAR memslot (ivshmem-like) above RAM, fully touched before, after
  the add and after the delete.

Zap events, N vCPUs, under either rule set: the restore 28N (as in W4: with CD=0 and E=1 from
the first write on, every one of the 28 MSRs zaps), then 2N for the add and 2N for the delete
(defType pairs under Base1, CD flips under Base2): 32N.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import GIB, MIB
from mtrremu.workloads.building import TraceBuilder, var_mask
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace
from mtrremu.workloads.w4_large import booted_table, mtrr_add_on, ram_shares, restore_running


@dataclass(frozen=True)
class Params:
    vcpus: int = 8
    ram: int = 16 * GIB
    #: "a" (a BAR in the PCI hole, no RAM) or "b" (a 32 GiB RAM-typed BAR memslot).
    variant: str = "a"
    bar_a: int = 0xE0000000
    bar_a_size: int = 256 * MIB
    bar_b: int = 64 * GIB
    bar_b_size: int = 32 * GIB
    #: Share of RAM the guest keeps touching around the changes.
    working_set: float = 0.25


def build(params: Params, seed: int = 1) -> Trace:
    if params.variant not in ("a", "b"):
        raise ValueError(f"unknown variant {params.variant!r}")
    slots = q35(params.ram)
    bar, size = (params.bar_a, params.bar_a_size)
    if params.variant == "b":
        bar, size = params.bar_b, params.bar_b_size
        slots = (*slots, Memslot.from_bytes(bar, size, name="ivshmem-bar"))
    config = VmConfig(vcpus=params.vcpus, noncoherent_dma=1, memslots=slots)
    b = TraceBuilder(config, seed)
    restore_running(b, booted_table(config.guest_maxphyaddr))

    def touch_all() -> None:
        for vcpu, start, length in ram_shares(b, params.working_set):
            if start < bar or start >= bar + size:
                b.touch(vcpu, start, length)
        if params.variant == "b":
            per = size // len(b.vcpus)
            for vcpu in b.vcpus:
                b.touch(vcpu, bar + vcpu * per, per)

    mask = var_mask(size, config.guest_maxphyaddr)
    touch_all()
    for vcpu in b.vcpus:
        b.add(mtrr_add_on(b, vcpu, 1, base=bar, mask=mask, mtype=MemType.WC))
    touch_all()
    for vcpu in b.vcpus:
        b.add(mtrr_add_on(b, vcpu, 1, base=bar, mask=0, mtype=MemType.WC))
    touch_all()
    return b.trace("W5", params)
