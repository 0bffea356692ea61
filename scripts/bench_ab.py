#!/usr/bin/env python3
"""A/B benchmark: the default job and the large W4 runs, in-process, timed in one run.

* the default job: W1, W2 and W7 with 8 vCPUs and 16 GiB under the five series rows and our
  three experimental configurations (``precise``, ``lazy``, ``lazy:scope=changed``);
* W4 with 416 vCPUs on 1.5 TiB at 2 MiB leaves (``cache_aps_init``) under the same strategies;
* W4 with 416 vCPUs at 4 KiB leaves (huge pages off, or split by dirty logging) on 256 GiB and
  on 12 TiB (3.2 G leaves) under ``fine-grained``;
* a trace file of 1,000,000 lines (MTRR writes, CR0 flips and accesses on 8 vCPUs) replayed
  under ``fine-grained``.

Last line: ``default_job_seconds=<a> w4_1_5TiB_seconds=<b> w4_256GiB_4K_seconds=<c>
w4_12TiB_4K_seconds=<d> trace_1M_seconds=<e> peak_rss_mib=<f>`` (targets on a 2-core machine:
a <= 30, b <= 30, c <= 15, d <= 180, e <= 10, f <= 6144). ``--quick`` leaves out the 12 TiB
case (``w4_12TiB_4K_seconds=skipped``): what ``.ci/run`` runs.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mtrremu.ab.runner import InlineExecutor, Plan, default_strategies, run_all
from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import Access, Item, WriteCr0, WriteMsr
from mtrremu.core.units import GIB
from mtrremu.workloads.trace import Trace, save

TRACE_LINES = 1_000_000


def timed(plan: Plan) -> tuple[float, int]:
    started = time.perf_counter()
    records = run_all(plan.specs(), InlineExecutor())
    return time.perf_counter() - started, len(records)


def w4_4k(ram: str) -> Plan:
    return Plan(
        workloads=("W4",),
        strategies=["fine-grained"],
        params={"ram": ram, "max_mapping_level": "4K"},
    )


def long_trace(path: Path) -> None:
    """A trace of :data:`TRACE_LINES` lines (the header is one of them): firmware-like MTRR
    programming between CD flips and accesses, round robin over 8 vCPUs."""
    vcpus = 8
    cycle = [msrs.DEFTYPE, *msrs.FIXED_MSRS, *msrs.VAR_MSRS]
    items: list[Item] = []
    for i in range(TRACE_LINES - 1):
        vcpu, step = i % vcpus, (i // vcpus) % (len(cycle) + 3)
        if step == len(cycle):
            items.append(WriteCr0(vcpu, cr0.ET | cr0.PE))
        elif step == len(cycle) + 1:
            items.append(Access(vcpu, (i * 4096 * 7919) % (8 * GIB)))
        elif step == len(cycle) + 2:
            items.append(WriteCr0(vcpu, cr0.ET | cr0.PE | cr0.CD))
        else:
            msr = cycle[step]
            items.append(WriteMsr(vcpu, msr, 0xC06 if msr == msrs.DEFTYPE else 0))
    config = VmConfig(vcpus=vcpus, noncoherent_dma=1, track_staleness=True)
    save(Trace("long", config, tuple(items)), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the 12 TiB case")
    args = parser.parse_args()
    strategies = default_strategies()
    default_s, default_runs = timed(Plan(strategies=strategies))
    print(f"default job: {default_runs} runs in {default_s:.1f} s")
    w4_s, w4_runs = timed(Plan(workloads=("W4",), strategies=strategies))
    print(f"W4, 416 vCPUs, 1.5 TiB at 2 MiB: {w4_runs} runs in {w4_s:.1f} s")
    small_s, _ = timed(w4_4k("256G"))
    print(f"W4, 416 vCPUs, 256 GiB at 4 KiB, fine-grained: {small_s:.1f} s")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.jsonl"
        long_trace(path)
        trace_s, _ = timed(Plan(workloads=(), traces=[str(path)], strategies=["fine-grained"]))
    print(f"a {TRACE_LINES:,}-line trace, fine-grained: {trace_s:.1f} s")
    large = "skipped"
    if not args.quick:
        large_s, _ = timed(w4_4k("12T"))
        large = f"{large_s:.1f}"
        print(f"W4, 416 vCPUs, 12 TiB at 4 KiB, fine-grained: {large} s")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"default_job_seconds={default_s:.1f} w4_1_5TiB_seconds={w4_s:.1f} "
        f"w4_256GiB_4K_seconds={small_s:.1f} w4_12TiB_4K_seconds={large} "
        f"trace_1M_seconds={trace_s:.1f} peak_rss_mib={rss_mib:.0f}"
    )


if __name__ == "__main__":
    main()
