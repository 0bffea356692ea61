"""Each path's worst case against the memory bound docs/api.md#limits claims for it.

Peak memory is measured with tracemalloc (NumPy's arrays are traced too), which sees what the
emulator allocates and nothing of the shared machine's noise. The worst case of each path is a
VM mapped entirely with 4 KiB leaves (the EPT's largest form), or many accesses outside every
memslot. The bounds are the documentation's (predictions, not calibrations): the EPT about one
byte per 4 KiB page, up to twice that while its arrays grow; one 1 GiB region's leaves for
DumpLeaves; the MMIO marker budget; an export holds one copy of the EPT plus 8 MiB of file, an
import the file's 8 MiB, the arrays and the new EPT.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.units import GIB, KIB, MIB, Level
from mtrremu.core.vm import MMIO_TABLES_MIN
from tests.helpers import make_vm, serving

GUEST_BYTES = 16 * GIB
#: What the documentation says an EPT costs: a byte per 4 KiB page.
EPT_BYTES = GUEST_BYTES // (4 * KIB)
#: Room for the interpreter's own allocations during a call (messages, frames, small objects).
SLACK = 4 * MIB


def measure(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def mapped_config() -> VmConfig:
    return VmConfig(
        noncoherent_dma=1,
        memslots=(Memslot.from_bytes(0, GUEST_BYTES),),
        max_mapping_level=Level.K4,
    )


def test_fault_range_of_a_whole_vm_stays_within_twice_the_ept() -> None:
    vm = make_vm(memslots=(Memslot.from_bytes(0, GUEST_BYTES),), max_mapping_level=Level.K4)
    vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    used = measure(lambda: vm.fault_range(0, 0, GUEST_BYTES))
    assert vm.store.leaf_total == GUEST_BYTES // (4 * KIB)
    assert used <= 2 * EPT_BYTES + SLACK, f"{used >> 20} MiB for a {EPT_BYTES >> 20} MiB EPT"


def test_mmio_markers_stay_within_their_table_budget() -> None:
    vm = make_vm(memslots=(Memslot.from_bytes(0, 4 * KIB),))
    # Accesses outside the one page of RAM, each in a 2 MiB region of its own: each would need
    # a new 4 KiB table (and often a 2 MiB one) without the budget.

    def accesses() -> None:
        for i in range(20_000):
            vm.access(0, GIB + i * 2 * MIB)

    used = measure(accesses)
    assert vm.store.mmio_tables <= MMIO_TABLES_MIN
    # A table costs at most 512 entry bytes and 512 child ids of 4 bytes.
    table_bytes = 512 * 5
    assert vm.store.nbytes <= 3 * MMIO_TABLES_MIN * table_bytes + 64 * KIB
    assert used <= SLACK, f"{used >> 20} MiB"


def test_export_holds_one_copy_of_the_ept_and_import_the_file_arrays_and_ept() -> None:
    with serving() as server, Client(server.addresses[0], timeout=120) as client:
        vm = client.create_vm(mapped_config(), "fine-grained")
        vm.write_msr(0, msrs.DEFTYPE, 0xC06)
        vm.fault_range(0, 0, GUEST_BYTES)
        data: list[bytes] = []
        exported = measure(lambda: data.append(vm.export()))
        file_bytes = len(data[0])
        # The client holds the file it received too; the server one EPT copy and 8 MiB.
        assert exported <= EPT_BYTES + 8 * MIB + 2 * file_bytes + SLACK, f"{exported >> 20} MiB"
        imported = measure(lambda: client.import_vm(data[0]))
        assert imported <= 8 * MIB + 3 * EPT_BYTES + SLACK, f"{imported >> 20} MiB"
