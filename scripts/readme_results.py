"""Regenerate the README's results block: the default job's tables, in-process, as
``mtrremu ab`` prints them (every number in them is reproducible; wall times are left out),
its W2 chart, ``docs/images/ab-w2.png``, and the timing model's cycles next to the published
ones, ``docs/images/cycles.png`` (the check compares the text only: PNG bytes depend on the
matplotlib build).

    python scripts/readme_results.py          # rewrite the block
    python scripts/readme_results.py --check  # exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from mtrremu.ab.report import LEGEND, published_table, tables, write_charts
from mtrremu.ab.runner import InlineExecutor, Plan, default_strategies, run_all

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHART = ROOT / "docs" / "images" / "ab-w2.png"
CYCLES_CHART = ROOT / "docs" / "images" / "cycles.png"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def block() -> tuple[str, list[dict[str, Any]]]:
    records = run_all(Plan(strategies=default_strategies()).specs(), InlineExecutor())
    out = io.StringIO()
    console = Console(file=out, width=132, color_system=None, force_terminal=False)
    for table in tables(records):
        console.print(table)
    console.print(LEGEND)
    extra = published_table(records)
    if extra is not None:
        console.print(extra)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    return "\n".join([BEGIN, "```text", *lines, "```", END]), records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check, change nothing")
    args = parser.parse_args()
    text = README.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    results, records = block()
    updated = head + results + tail
    if args.check:
        if updated != text:
            print("README.md's results are out of date: run python scripts/readme_results.py")
            return 1
        return 0
    README.write_text(updated)
    with tempfile.TemporaryDirectory() as folder:
        (chart,) = write_charts([r for r in records if r["workload"] == "W2"], Path(folder))
        CHART.parent.mkdir(exist_ok=True)
        shutil.copyfile(chart, CHART)
    cycles_chart([r for r in records if r["published"] and r["published"]["cycles_m"]])
    return 0


def cycles_chart(records: list[dict[str, Any]]) -> None:
    """Published against modelled cycles, per row and firmware, on a log scale."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, panels = plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
    for axes, workload in zip(panels, ("W2", "W1"), strict=True):
        rows = [r for r in records if r["workload"] == workload]
        places = range(len(rows))
        published = [r["published"]["cycles_m"] for r in rows]
        axes.bar([p - 0.2 for p in places], published, 0.4, label="published", color="#888888")
        modelled = [r["cycles_model"] for r in rows]
        axes.bar([p + 0.2 for p in places], modelled, 0.4, label="model", color="#4c72b0")
        axes.set_yscale("log")
        axes.set_xticks(list(places))
        axes.set_xticklabels([r["strategy"] for r in rows], rotation=30, ha="right", fontsize=9)
        axes.set_title(f"{workload} ({rows[0]['published']['firmware']}): cycles in zap calls, M")
        axes.legend()
    figure.tight_layout()
    figure.savefig(CYCLES_CHART, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
