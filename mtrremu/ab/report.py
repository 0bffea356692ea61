"""Reports of A/B records: the table, JSON Lines, CSV and PNG charts.

Everything here is derived from the records (see :mod:`.records`), so a JSONL file can be
re-rendered later with the same result. Red means STALE and nothing else: a strategy that left
memory types wrong. A FAILED run (its strategy broke, or the replay could not finish) is shown
in its own style, with the plugin, the hook and the error.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mtrremu.ab.published import NOT_MODELLED
from mtrremu.workloads import WORKLOADS

#: The counted columns of each table: (header, counter).
TABLE_COUNTERS = (
    ("zaps\nrun", "zaps_executed"),
    ("dups", "duplicates_dropped"),
    ("leaves\nremoved", "leaves_removed"),
    ("entries\nvisited", "entries_visited"),
    ("TLB\nflush", "tlb_flushes"),
    ("re-\nfaults", "refaults"),
    ("de-\nferred", "recalc_work"),
)
#: The chart's panels: the headline (next to the published counts) first, then counted work.
CHART_METRICS = (
    "zap_events",
    "zaps_executed",
    "leaves_removed",
    "entries_visited",
    "tlb_flushes",
    "refaults",
    "recalc_work",
    "cycles_model",
)
STALE_STYLE = "bold white on red"
FAILED_STYLE = "bold black on yellow"


def is_stale(record: dict[str, Any]) -> bool:
    return bool(record["verdict"] == "stale")


def is_failed(record: dict[str, Any]) -> bool:
    return bool(record["verdict"] == "failed")


def workload_title(workload: str) -> str:
    """``W1 SeaBIOS -> Linux (q35)``: the id and what it stands for (a trace file: its name)."""
    known = WORKLOADS.get(workload)
    return f"{workload} {known.title}" if known else f"trace {workload}"


def describe(record: dict[str, Any]) -> str:
    """A run's setup for people: vCPUs, RAM, and what the command line varied."""
    ram = record["params"].get("ram")
    memory = f"{ram / (1 << 30):g} GiB" if isinstance(ram, int) else ""
    varied = " ".join(p for p in record["label"].split() if not p.startswith(("vcpus=", "ram=")))
    return f"{record['config']['vcpus']} vCPUs {memory} {varied}".replace("  ", " ").strip()


def groups(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(workload, configuration label) pairs in first-seen order."""
    return list(dict.fromkeys((r["workload"], r["label"]) for r in records))


def failure_text(record: dict[str, Any]) -> str:
    """What broke, naming the plugin's distribution and the hook."""
    failure, plugin = record["failure"], record["plugin"]
    origin = f"{plugin['distribution']} {plugin['version']}".strip()
    hook = f" in {failure['hook']}" if failure["hook"] else ""
    return f"{failure['kind']} failure{hook} ({origin}): {failure['error']}"


def _verdict(record: dict[str, Any]) -> Text:
    if is_failed(record):
        return Text("FAILED", style=FAILED_STYLE)
    if is_stale(record):
        return Text("STALE", style=STALE_STYLE)
    return Text("clean")


def _zap_events(record: dict[str, Any]) -> str:
    """Our zap events, and the published count beside them where there is one."""
    ours = record["counters"]["zap_events"]
    pub = record.get("published")
    if not pub:
        return f"{ours:,}"
    mark = "=" if pub["zap_count"] == ours else "≠"
    return f"{ours:,} {mark}{pub['zap_count']}"


def _stale(record: dict[str, Any]) -> Text:
    """``points/events``: quiescent points with stale leaves, events that left their own vCPU
    stale; ``+N`` when stale leaves remain at the end."""
    s = record["staleness"]
    text = f"{s['stale_points']}/{s['stale_events']}"
    if s["at_end"]:
        text += f" +{s['at_end']}"
    return Text(text, style=STALE_STYLE if is_stale(record) else "")


def _strategy_column(table: Table, records: Sequence[dict[str, Any]]) -> None:
    """A strategy column as wide as the longest name: names are never cut."""
    width = max((len(r["strategy"]) for r in records), default=8)
    table.add_column("strategy", style="bold", no_wrap=True, min_width=width)


def tables(records: Sequence[dict[str, Any]]) -> list[Table]:
    """One table per workload and configuration, one row per strategy."""
    result = []
    for workload, label in groups(records):
        rows = [r for r in records if (r["workload"], r["label"]) == (workload, label)]
        mode = rows[0]["mode"]
        table = Table(
            title=f"{workload_title(workload)}: {describe(rows[0])} ({mode})",
            box=box.SIMPLE_HEAD,
            title_style="bold",
            pad_edge=False,
            collapse_padding=True,
        )
        _strategy_column(table, rows)
        table.add_column("verdict", no_wrap=True, min_width=7)
        headers = ["zap\nevents", *(h for h, _ in TABLE_COUNTERS), "cycles M\n(model)"]
        headers += ["re-\nfused"]
        headers += ["stale\npts/ev", "ex-\ncused"]
        for header in headers:
            width = max(len(line) for line in header.splitlines())
            table.add_column(header, justify="right", no_wrap=True, min_width=width)
        for r in rows:
            counters = r["counters"]
            table.add_row(
                r["strategy"],
                _verdict(r),
                _zap_events(r),
                *(f"{counters[key]:,}" for _, key in TABLE_COUNTERS),
                _modelled(r),
                str(sum(r["refused"].values())),
                _stale(r),
                str(sum(r["staleness"]["excused"].values())),
            )
        result.append(table)
    return result


def published_table(records: Sequence[dict[str, Any]]) -> Table | None:
    """The cover letter's published numbers next to our counted work, for published setups."""
    rows = [r for r in records if r.get("published") and not is_failed(r)]
    if not rows:
        return None
    result = Table(
        title="Next to the cover letter (8 vCPUs, 16 GiB): (pub.) columns are its figures, "
        "(ours) are counted here, (model) is the timing model fitted on them",
        show_lines=False,
    )
    result.add_column("workload", no_wrap=True)
    _strategy_column(result, rows)
    for name in (
        "zap events (ours)",
        "zap cnt (pub.)",
        "cycles, M (pub.)",
        "cycles, M (model)",
        "cycles vs zap-all (pub.)",
        "entries visited vs zap-all (ours)",
        "leaves removed vs zap-all (ours)",
    ):
        result.add_column(name, justify="right")
    base = {(r["workload"], r["label"]): r for r in rows if r["strategy"] == "zap-all"}
    for r in rows:
        ref = base.get((r["workload"], r["label"]))
        pub = r["published"]
        cycles = pub["cycles_m"]
        ref_cycles = ref["published"]["cycles_m"] if ref else None
        result.add_row(
            f"{r['workload']} ({pub['firmware']})",
            r["strategy"],
            str(r["counters"]["zap_events"]),
            str(pub["zap_count"]),
            f"{cycles:,.2f}" if cycles is not None else "",
            _modelled(r),
            _ratio(cycles, ref_cycles),
            _ratio(r["counters"]["entries_visited"], _counter(ref, "entries_visited")),
            _ratio(r["counters"]["leaves_removed"], _counter(ref, "leaves_removed")),
        )
    return result


def _modelled(record: dict[str, Any]) -> str:
    """The timing model's cycles (millions); ``~`` marks a prediction (no published figure for
    the setup to calibrate on)."""
    cycles = record["cycles_model"]
    if cycles is None:
        return ""
    return f"{'~' if record['cycles_basis'] == 'prediction' else ''}{cycles:,.2f}"


def _counter(record: dict[str, Any] | None, name: str) -> float | None:
    return None if record is None else float(record["counters"][name])


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f"{value / reference:.3f}x"


#: What the tables' columns mean, printed under them.
LEGEND = (
    'zap events: the cover letter\'s "zap cnt" (MTRR writes and CR0.CD toggles that reached a '
    "zap path); '=N'/'≠N' compares it with the count the cover letter published. Every other "
    "number is counted here. stale pts/ev: quiescent points with stale leaves / events that "
    "left their own vCPU's view stale (+N: stale leaves at the end). excused: events whose stale "
    "leaves a KVM gap the strategy declares explains. cycles M (model): the timing model's "
    "cycles spent inside zap calls, in millions (docs/timing.md); ~ marks a prediction, without "
    "a published figure for the setup. refused: operations the emulator refused "
    "(they changed nothing). Wall times are in the JSON Lines and CSV files."
)


def print_report(records: Sequence[dict[str, Any]], console: Console) -> None:
    for one in tables(records):
        console.print(one)
    console.print(LEGEND, style="dim")
    extra = published_table(records)
    if extra is not None:
        console.print(extra)
        console.print("What the timing model leaves out:")
        for note in NOT_MODELLED:
            console.print(f"  - {note}")
    for r in records:
        where = f"{r['strategy']} on {workload_title(r['workload'])} ({r['label']})"
        if is_failed(r):
            console.print(Text(" FAILED ", style=FAILED_STYLE), f"{where}: {failure_text(r)}")
        elif is_stale(r):
            console.print(Text(" STALE ", style=STALE_STYLE), f"{where}: {stale_text(r)}")
        if r["refused"]:
            listed = ", ".join(f"{n} {reason}" for reason, n in r["refused"].items())
            console.print(f"refused operations in {where}: {listed} (they changed nothing)")


def stale_text(record: dict[str, Any]) -> str:
    """Where the oracle found stale leaves, in words."""
    s = record["staleness"]
    parts = []
    if s["stale_points"]:
        parts.append(
            f"stale leaves at {s['stale_points']} quiescent points (max {s['stale_leaves_max']})"
        )
    if s["at_end"]:
        parts.append(f"{s['at_end']} at the end")
    if s["stale_events"]:
        parts.append(
            f"{s['stale_events']} events left their own vCPU stale "
            f"(max {s['stale_event_leaves_max']} leaves); first: {s['first_stale_event']}"
        )
    return "; ".join(parts) + ": this strategy leaves memory types wrong."


# -- files ----------------------------------------------------------------------------------


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w") as out:
        for r in records:
            out.write(json.dumps(r, sort_keys=True) + "\n")


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per run: identity columns, the verdict, every counter, the oracle, the timing
    model, wall time."""
    counters = sorted({k for r in records for k in r["counters"]})
    head = ["workload", "label", "strategy", "profile", "distribution", "version", "seed"]
    head += ["vcpus", "memory_bytes", "mode", "verdict", "failure", "refused"]
    tail = ["stale_checks", "stale_points", "stale_leaves_max", "stale_at_end"]
    tail += ["event_checks", "stale_events", "stale_event_leaves_max", "excused"]
    tail += ["cycles_model", "cycles_work", "cycles_waiting", "cycles_yields", "cycles_basis"]
    tail += ["wall_seconds"]
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
                    r["verdict"],
                    failure_text(r) if is_failed(r) else "",
                    " ".join(f"{reason}={n}" for reason, n in r["refused"].items()),
                ]
                + [r["counters"][c] for c in counters]
                + [
                    s["checks"],
                    s["stale_points"],
                    s["stale_leaves_max"],
                    s["at_end"],
                    s["event_checks"],
                    s["stale_events"],
                    s["stale_event_leaves_max"],
                    " ".join(f"{gap}={n}" for gap, n in s["excused"].items()),
                    r["cycles_model"],
                    *(
                        (r["cycles_parts"] or {}).get(part)
                        for part in ("work", "waiting", "yields")
                    ),
                    r["cycles_basis"],
                    r["wall_seconds"],
                ]
            )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def write_charts(records: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per workload and configuration: the zap events next to the published counts,
    then the counted work, one panel per metric, one bar per strategy."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for workload, label in groups(records):
        rows = [r for r in records if r["workload"] == workload and r["label"] == label]
        path = folder / f"{_slug(workload)}-{_slug(label)}.png"
        _chart(rows, f"{workload_title(workload)}: {describe(rows[0])}", path)
        paths.append(path)
    return paths


#: Bar colours: one blue for clean runs, so red means STALE and nothing else.
_CLEAN_COLOUR = "#4c72b0"
_STALE_COLOUR = "#d62728"
_FAILED_COLOUR = "#bdbdbd"


def _chart(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    # matplotlib costs a third of a second to import: only runs that draw pay it.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [r["strategy"] for r in rows]
    height = 1.6 + 0.32 * len(rows)
    columns = 3
    lines = -(-len(CHART_METRICS) // columns)
    figure, grid = plt.subplots(
        lines, columns, figsize=(15, height * lines), dpi=100, squeeze=False, layout="constrained"
    )
    colours = [
        _STALE_COLOUR if is_stale(r) else _FAILED_COLOUR if is_failed(r) else _CLEAN_COLOUR
        for r in rows
    ]
    places = list(range(len(rows)))
    for index, metric in enumerate(CHART_METRICS):
        axes = grid[index // columns][index % columns]
        values = [_metric(r, metric) for r in rows]
        axes.barh(places, values, color=colours, edgecolor="black", linewidth=0.4)
        ends = list(values)
        panel = metric.replace("_", " ")
        if metric == "zap_events":
            _published_marks(axes, rows)
            ends = [
                max(v, r["published"]["zap_count"] if r["published"] else 0)
                for v, r in zip(values, rows, strict=True)
            ]
            panel += " (◆ the cover letter's count)"
        axes.set_xlim(0, max([*ends, 1]) * 1.4)
        for place, r, value, end in zip(places, rows, values, ends, strict=True):
            verdict = " STALE" if is_stale(r) else " FAILED" if is_failed(r) else ""
            axes.text(
                end,
                place,
                f" {value:,}{verdict}",
                va="center",
                fontsize=9,
                color=_STALE_COLOUR if is_stale(r) else "black",
                fontweight="bold" if verdict else "normal",
            )
        axes.set_title(panel, fontsize=11)
        axes.set_yticks(places)
        if index % columns:
            axes.set_yticklabels([])
        else:
            for tick, r in zip(axes.set_yticklabels(names, fontsize=10), rows, strict=True):
                if is_stale(r):
                    tick.set_color(_STALE_COLOUR)
                    tick.set_fontweight("bold")
        axes.invert_yaxis()
        axes.tick_params(axis="x", labelsize=9)
    for index in range(len(CHART_METRICS), lines * columns):
        grid[index // columns][index % columns].axis("off")
    stale = [r["strategy"] for r in rows if is_stale(r)]
    verdict = f"STALE (red): {', '.join(stale)}" if stale else "no stale leaves"
    figure.suptitle(
        title + "\n" + textwrap.fill(f"staleness oracle: {verdict}", 150),
        fontsize=13,
        color=_STALE_COLOUR if stale else "black",
    )
    figure.savefig(path)
    plt.close(figure)


def _metric(record: dict[str, Any], metric: str) -> float:
    if metric == "cycles_model":
        return float(record["cycles_model"] or 0.0)
    return float(record["counters"][metric])


def _published_marks(axes: Any, rows: Sequence[dict[str, Any]]) -> None:
    """A black diamond at the cover letter's zap count for each strategy it published."""
    marks = [(i, r["published"]["zap_count"]) for i, r in enumerate(rows) if r["published"]]
    if not marks:
        return
    axes.scatter(
        [count for _, count in marks],
        [place for place, _ in marks],
        marker="D",
        color="black",
        zorder=3,
    )
