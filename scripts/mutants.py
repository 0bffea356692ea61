"""Do the workloads catch broken strategies? Every mutant of :mod:`mtrremu.testing.mutants`
through the default job (``mtrremu ab`` with no workload given) and through every workload and
variant, with the built-in strategies as controls.

A mutant is *caught* by a run when the run's verdict is STALE. The last line reads
``mutants=<n> caught_default=<n> caught_all=<n>``; the exit status is 0 when every mutant is
caught by the default job and by some workload, and the series' strategies and our experimental
ones stay clean on every run; 1 otherwise.

    python scripts/mutants.py [--executor local:N]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from mtrremu.ab.published import ROWS
from mtrremu.ab.runner import DEFAULT_WORKLOADS, EXPERIMENTS, RunSpec, executor_for, run_all
from mtrremu.testing.mutants import MUTANTS

PLUGIN = "mtrremu.testing.mutants"
#: Every workload, with the variants that change what happens: (column, workload, overrides).
CONFIGS: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = (
    ("W1", "W1", ()),
    ("W2", "W2", ()),
    ("W7", "W7", ()),
    ("W3", "W3", ()),
    ("W3 pvh", "W3", (("boot_protocol", "pvh"),)),
    ("W3 crosvm", "W3", (("vmm", "crosvm"),)),
    ("W4", "W4", ()),
    ("W4 mtrr_add", "W4", (("event", "mtrr_add"),)),
    ("W5 a", "W5", ()),
    ("W5 b", "W5", (("variant", "b"),)),
    ("W6 kvm", "W6", (("variant", "kvm"),)),
    ("W6 cd0", "W6", ()),
)
#: The series' strategies and ours must stay clean everywhere; released KVM is shown for
#: comparison.
SERIES = (*(name for name in ROWS if name != "kvm-6.5"), *EXPERIMENTS)
CONTROLS = ("kvm-6.5", "kvm-6.7", "kvm-6.11", *SERIES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executor", default="local:2", help="local:N or dask://host:port")
    args = parser.parse_args()
    strategies = [*MUTANTS, *CONTROLS]
    specs = [
        RunSpec(workload, strategy, overrides=overrides, plugins=(PLUGIN,))
        for _, workload, overrides in CONFIGS
        for strategy in strategies
    ]
    started = time.perf_counter()
    with executor_for(args.executor) as executor:
        records = run_all(specs, executor)
    seconds = time.perf_counter() - started
    verdict = {
        (column, spec.strategy): record["verdict"]
        for (column, _, _), spec, record in zip(
            [c for c in CONFIGS for _ in strategies], specs, records, strict=True
        )
    }
    console = Console(width=max(Console().width, 180))
    table = Table(title=f"Mutants and controls, {len(records)} runs in {seconds:.1f} s")
    table.add_column("strategy", no_wrap=True)
    table.add_column("default job", no_wrap=True)
    for column, _, _ in CONFIGS:
        table.add_column(column, no_wrap=True, justify="center")
    marks = {"stale": "[bold white on red]STALE[/]", "failed": "[black on yellow]FAILED[/]"}
    caught_default = caught_all = 0
    controls_stale = []
    for strategy in strategies:
        row = [verdict[column, strategy] for column, _, _ in CONFIGS]
        default = [verdict[w, strategy] for w in DEFAULT_WORKLOADS]
        if strategy in MUTANTS:
            caught_default += "stale" in default
            caught_all += "stale" in row
        elif strategy in SERIES and any(v != "clean" for v in row):
            controls_stale.append(strategy)
        summary = "caught" if "stale" in default else "-"
        table.add_row(strategy, summary, *(marks.get(v, "·") for v in row))
    console.print(table)
    console.print(
        "Mutants are deliberately broken strategies (mtrremu/testing/mutants.py); controls are "
        "the built-in ones. The default job is W1, W2 and W7 as 'mtrremu ab' runs them."
    )
    for strategy in controls_stale:
        console.print(f"[bold red]control {strategy} is not clean on every workload[/]")
    print(f"mutants={len(MUTANTS)} caught_default={caught_default} caught_all={caught_all}")
    met = caught_default == caught_all == len(MUTANTS) and not controls_stale
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
