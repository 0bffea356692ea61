"""Regenerate the README's results block: the default job's tables, in-process, as
``mtrremu ab`` prints them (every number in them is reproducible; wall times are left out),
and its W2 chart, ``docs/images/ab-w2.png`` (the check compares the text only: PNG bytes
depend on the matplotlib build).

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
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def block() -> tuple[str, list[dict[str, Any]]]:
    records = run_all(Plan(strategies=default_strategies()).specs(), InlineExecutor())
    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None, force_terminal=False)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
