#!/usr/bin/env python3
"""A/B benchmark: the default job and the large W4 run, in-process, timed in one run.

* the default job: W1, W2 and W7 with 8 vCPUs and 16 GiB under the five series rows and our
  three experimental configurations (``precise``, ``lazy``, ``lazy:scope=changed``);
* W4 with 416 vCPUs on 1.5 TiB at 2 MiB leaves (``cache_aps_init``) under the same strategies.

Last line: ``default_job_seconds=<x> w4_1_5TiB_seconds=<y> peak_rss_mib=<z>`` (targets on a
2-core machine: 60 s, 120 s, 2048 MiB).
"""

from __future__ import annotations

import resource
import time

from mtrremu.ab.runner import InlineExecutor, Plan, default_strategies, run_all


def timed(plan: Plan) -> tuple[float, int]:
    started = time.perf_counter()
    records = run_all(plan.specs(), InlineExecutor())
    return time.perf_counter() - started, len(records)


def main() -> None:
    strategies = default_strategies()
    default_s, default_runs = timed(Plan(strategies=strategies))
    w4_s, w4_runs = timed(Plan(workloads=("W4",), strategies=strategies))
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"default job: {default_runs} runs in {default_s:.1f} s")
    print(f"W4, 416 vCPUs, 1.5 TiB at 2 MiB: {w4_runs} runs in {w4_s:.1f} s")
    print(
        f"default_job_seconds={default_s:.1f} w4_1_5TiB_seconds={w4_s:.1f} "
        f"peak_rss_mib={rss_mib:.0f}"
    )


if __name__ == "__main__":
    main()
