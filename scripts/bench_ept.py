#!/usr/bin/env python3
"""EPT store benchmark: fault a 16 GiB guest in at 4 KiB, zap it all, compare with numpy.

Each per-leaf cost is divided by the per-slot cost of a numpy fill of the same number of 8-byte
slots (fresh memory, like the store's), measured in the same run: a ratio, not a wall time, so
shared, noisy machines still give comparable numbers. Best of ``--repeat`` runs each.

Last line: ``fault_ratio=<x> zap_ratio=<y> bytes_per_leaf=<z>`` (targets: both ratios <= 10,
bytes_per_leaf <= 16).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.units import GIB, PAGE_SHIFT, ZAP_ALL, Level
from mtrremu.plugin.manager import PluginManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=16, help="guest RAM in GiB (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    args = parser.parse_args()
    pages = args.gib * GIB >> PAGE_SHIFT
    config = VmConfig(
        noncoherent_dma=1,
        memslots=(Memslot.from_bytes(0, args.gib * GIB),),
        max_mapping_level=Level.K4,
    )
    manager = PluginManager(entry_points=False)
    fault_s, zap_s, fill_s = [], [], []
    bytes_per_leaf = 0.0
    for _ in range(args.repeat):
        vm = manager.create_vm(config, "zap-all")
        started = time.perf_counter()
        result = vm.fault_range(0, 0, args.gib * GIB)
        fault_s.append(time.perf_counter() - started)
        assert result.counters.faults == pages == vm.store.leaf_total
        bytes_per_leaf = vm.store.nbytes / vm.store.leaf_total
        started = time.perf_counter()
        outcome = vm.store.zap(ZAP_ALL)
        zap_s.append(time.perf_counter() - started)
        assert outcome.leaves_removed == pages
        started = time.perf_counter()
        slots = np.empty(pages, dtype=np.int64)
        slots.fill(0x0123456789ABCDEF)
        fill_s.append(time.perf_counter() - started)
        del slots, vm
    fill = min(fill_s)
    print(f"leaves: {pages} ({args.gib} GiB at 4 KiB)")
    print(f"fault: {min(fault_s) * 1e3:.1f} ms ({min(fault_s) / pages * 1e9:.1f} ns/leaf)")
    print(f"zap:   {min(zap_s) * 1e3:.1f} ms ({min(zap_s) / pages * 1e9:.1f} ns/leaf)")
    print(f"numpy fill of {pages} int64 slots: {fill * 1e3:.1f} ms")
    print(
        f"fault_ratio={min(fault_s) / fill:.2f} zap_ratio={min(zap_s) / fill:.2f} "
        f"bytes_per_leaf={bytes_per_leaf:.2f}"
    )


if __name__ == "__main__":
    main()
