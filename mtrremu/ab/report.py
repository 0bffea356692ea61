"""Reports of A/B records: the table, JSON Lines, CSV and PNG charts.

Everything here is derived from the records (see :mod:`.records`), so a JSONL file can be
re-rendered later with the same result.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mtrremu.ab.published import NOT_MODELLED

#: The rows of each table cell: (label, counter or special key).
CELL_ROWS = (
    ("zap events", "zap_events"),
    ("zaps executed", "zaps_executed"),
    ("duplicates dropped", "duplicates_dropped"),
    ("leaves removed", "leaves_removed"),
    ("entries visited", "entries_visited"),
    ("TLB flushes", "tlb_flushes"),
    ("refaults", "refaults"),
)
CHART_METRICS = ("zaps_executed", "leaves_removed", "entries_visited", "tlb_flushes", "refaults")


def stale_summary(record: dict[str, Any]) -> tuple[int, int | None]:
    """(quiescent points with stale leaves, stale leaves at the end or None)."""
    staleness = record["staleness"]
    return int(staleness["stale_points"]), staleness["at_end"]


def is_stale(record: dict[str, Any]) -> bool:
    points, end = stale_summary(record)
    return bool(points or end)


def describe(record: dict[str, Any]) -> str:
    """A run's setup for people: vCPUs, RAM, and what the command line varied."""
    ram = record["params"].get("ram")
    memory = f"{ram / (1 << 30):g} GiB" if isinstance(ram, int) else ""
    varied = " ".join(p for p in record["label"].split() if not p.startswith(("vcpus=", "ram=")))
    return f"{record['config']['vcpus']} vCPUs {memory} {varied}".replace("  ", " ").strip()


def groups(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(workload, configuration label) pairs in first-seen order."""
    return list(dict.fromkeys((r["workload"], r["label"]) for r in records))


def strategies(records: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["strategy"] for r in records))


def _cell(record: dict[str, Any]) -> Text:
    text = Text()
    counters = record["counters"]
    pub = record.get("published")
    for label, key in CELL_ROWS:
        value = f"{counters[key]:,}"
        if key == "zap_events" and pub:
            mark = "=" if pub["zap_count"] == counters[key] else "≠"
            value += f" ({mark} {pub['zap_count']} published)"
        text.append(f"{label:<19}{value}\n")
    points, end = stale_summary(record)
    style = "bold white on red" if points or end else ""
    end_text = "n/a (vCPUs disagree)" if end is None else str(end)
    most = record["staleness"]["stale_leaves_max"]
    text.append(f"{'stale after events':<19}", style=style)
    text.append(f"{points} pts (max {most})\n" if points else "0\n", style=style)
    text.append(f"{'stale at the end':<19}", style=style)
    text.append(f"{end_text}\n", style=style)
    text.append(f"{'wall time':<19}{record['wall_seconds']:.2f} s")
    return text


def table(records: Sequence[dict[str, Any]]) -> Table:
    """One row per strategy, one column per workload (and configuration)."""
    columns = groups(records)
    by_key = {(r["workload"], r["label"], r["strategy"]): r for r in records}
    mode = records[0]["mode"] if records else "in-process"
    result = Table(title=f"A/B comparison ({mode})", show_lines=True)
    result.add_column("strategy", style="bold")
    for workload, label in columns:
        first = next(r for r in records if (r["workload"], r["label"]) == (workload, label))
        result.add_column(f"{workload}\n{describe(first)}")
    for strategy in strategies(records):
        cells: list[Text | str] = [strategy]
        for workload, label in columns:
            found = by_key.get((workload, label, strategy))
            cells.append(_cell(found) if found else "")
        result.add_row(*cells)
    return result


def published_table(records: Sequence[dict[str, Any]]) -> Table | None:
    """The cover letter's cycles next to our counted work, for published setups."""
    rows = [r for r in records if r.get("published")]
    if not rows:
        return None
    result = Table(title="Next to the cover letter (8 vCPUs, 16 GiB)", show_lines=False)
    for name in (
        "workload",
        "strategy",
        "zap cnt (ours / published)",
        "cycles, M (published)",
        "cycles vs zap-all",
        "entries visited vs zap-all",
        "leaves removed vs zap-all",
    ):
        result.add_column(name)
    base = {(r["workload"], r["label"]): r for r in rows if r["strategy"] == "zap-all"}
    for r in rows:
        ref = base.get((r["workload"], r["label"]))
        pub = r["published"]
        cycles = pub["cycles_m"]
        ref_cycles = ref["published"]["cycles_m"] if ref else None
        result.add_row(
            f"{r['workload']} ({pub['firmware']})",
            r["strategy"],
            f"{r['counters']['zap_events']} / {pub['zap_count']}",
            f"{cycles:,.2f}" if cycles is not None else "",
            _ratio(cycles, ref_cycles),
            _ratio(r["counters"]["entries_visited"], _counter(ref, "entries_visited")),
            _ratio(r["counters"]["leaves_removed"], _counter(ref, "leaves_removed")),
        )
    return result


def _counter(record: dict[str, Any] | None, name: str) -> float | None:
    return None if record is None else float(record["counters"][name])


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f"{value / reference:.3f}x"


def print_report(records: Sequence[dict[str, Any]], console: Console) -> None:
    console.print(table(records))
    extra = published_table(records)
    if extra is not None:
        console.print(extra)
        console.print("Published reductions the counted work cannot show:")
        for note in NOT_MODELLED:
            console.print(f"  - {note}")
    stale = [r for r in records if is_stale(r)]
    for r in stale:
        points, end = stale_summary(r)
        console.print(
            f"[bold white on red] STALE [/] {r['strategy']} on {r['workload']} ({r['label']}): "
            f"stale leaves at {points} quiescent points "
            f"(max {r['staleness']['stale_leaves_max']}), {end} at the end: "
            "this strategy leaves memory types wrong."
        )


# -- files ----------------------------------------------------------------------------------


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w") as out:
        for r in records:
            out.write(json.dumps(r, sort_keys=True) + "\n")


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per run: identity columns, every counter, the staleness verdict, wall time."""
    counters = sorted({k for r in records for k in r["counters"]})
    head = ["workload", "label", "strategy", "profile", "distribution", "version", "seed"]
    head += ["vcpus", "memory_bytes", "mode"]
    tail = ["stale_checks", "stale_points", "stale_leaves_max", "stale_at_end", "wall_seconds"]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(head + counters + tail)
        for r in records:
            s = r["staleness"]
            writer.writerow(
                [
                    r["workload"],
                    r["label"],
                    r["strategy"],
                    r["profile"],
                    r["plugin"]["distribution"],
                    r["plugin"]["version"],
                    r["seed"],
                    r["config"]["vcpus"],
                    r["config"]["memory_bytes"],
                    r["mode"],
                ]
                + [r["counters"][c] for c in counters]
                + [
                    s["checks"],
                    s["stale_points"],
                    s["stale_leaves_max"],
                    s["at_end"],
                    r["wall_seconds"],
                ]
            )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def write_charts(records: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per workload and configuration: counted work by strategy."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for workload, label in groups(records):
        rows = [r for r in records if r["workload"] == workload and r["label"] == label]
        path = folder / f"{_slug(workload)}-{_slug(label)}.png"
        _chart(rows, f"{workload}: {describe(rows[0])}", path)
        paths.append(path)
    return paths


def _chart(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    # matplotlib costs a third of a second to import: only runs that draw pay it.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(11, 5.5), dpi=110)
    width = 0.8 / max(len(rows), 1)
    values = [[r["counters"][m] for m in CHART_METRICS] for r in rows]
    positive = [v for row in values for v in row if v > 0]
    spread = max(positive) / min(positive) if positive else 1
    colours = plt.get_cmap("tab10")
    for i, (r, row) in enumerate(zip(rows, values, strict=True)):
        stale = is_stale(r)
        offsets = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(CHART_METRICS))]
        label = r["strategy"] + ("  (STALE)" if stale else "")
        bars = axes.bar(
            offsets,
            row,
            width,
            label=label,
            color=colours(i % 10),
            edgecolor="red" if stale else "black",
            linewidth=2.5 if stale else 0.5,
            hatch="//" if stale else None,
        )
        axes.bar_label(bars, labels=[f"{v:,}" for v in row], fontsize=6, rotation=90, padding=2)
    axes.set_xticks(range(len(CHART_METRICS)))
    axes.set_xticklabels([m.replace("_", " ") for m in CHART_METRICS])
    if spread > 50:
        axes.set_yscale("symlog", linthresh=1)
        axes.set_ylabel("count (log scale)")
    else:
        axes.set_ylabel("count")
    any_stale = any(is_stale(r) for r in rows)
    verdict = "STALE LEAVES FOUND (hatched, red edge)" if any_stale else "no stale leaves"
    axes.set_title(f"{title}\nstaleness oracle: {verdict}", color="red" if any_stale else "black")
    axes.legend(fontsize=8, loc="upper right")
    axes.margins(y=0.15)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
