"""``mtrremu ab``, run as a real subprocess: its options, its files (JSON Lines, CSV, PNG
charts), reproducibility, the cross product it plans, and every executor and target."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from mtrremu.ab.records import SCHEMA
from mtrremu.cli import build_parser
from mtrremu.core.counters import Counters
from mtrremu.core.events import DetachDma, WriteMsr
from mtrremu.workloads import WORKLOADS, build
from mtrremu.workloads.building import LinuxParams
from mtrremu.workloads.trace import load, save
from tests.helpers import GIB, run_ab, run_mtrremu

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The cross product most tests share: 2 vCPU counts x 2 seeds x 2 strategies on W3.
CROSS = ["-w", "W3", "--vcpus", "2", "--vcpus", "3", "--seed", "1", "--seed", "2"]
CROSS += ["-s", "zap-all", "-s", "fine-grained"]
#: W1, small, under a series row and our experimental strategies (options included).
W1_SMALL = [
    *("-w", "W1", "--vcpus", "2", "--memory", "4G"),
    *("-s", "zap-all", "-s", "fine-grained", "-s", "precise", "-s", "lazy:scope=changed"),
]
#: Every record field records.py documents.
RECORD_FIELDS = {
    "schema",
    "workload",
    "params",
    "seed",
    "strategy",
    "profile",
    "plugin",
    "config",
    "label",
    "mode",
    "target",
    "operations",
    "verdict",
    "failure",
    "refused",
    "host_disagreements",
    "counters",
    "staleness",
    "published",
    "cycles_model",
    "cycles_parts",
    "cycles_basis",
    "wall_seconds",
    "mtrremu_version",
}
CONFIG_FIELDS = {
    "vcpus",
    "memory_bytes",
    "quirk_cd_nw_cleared",
    "feature_mtrr",
    "guest_maxphyaddr",
    "max_mapping_level",
    "memslots",
}
COUNTERS = {f.name for f in dataclasses.fields(Counters)} | {
    "leaves_removed",
    "entries_visited",
    "recalc_work",
}


def records_of(out: Path) -> list[dict[str, Any]]:
    with (out / "ab.jsonl").open() as source:
        return [json.loads(line) for line in source]


def ab_ok(*args: str, out: Path, charts: bool = False) -> list[dict[str, Any]]:
    """Run ``mtrremu ab``, insist it succeeded, and return its records."""
    done = run_ab(*args, out=out, charts=charts)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return records_of(out)


def stable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without ``wall_seconds``, the one field that is not reproducible."""
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]


def outcome(r: dict[str, Any]) -> tuple[object, ...]:
    """What a run found: the same in-process and through a server."""
    return r["label"], r["strategy"], r["counters"], r["staleness"], r["cycles_model"]


@dataclasses.dataclass(frozen=True)
class Run:
    out: Path
    done: subprocess.CompletedProcess[str]
    records: list[dict[str, Any]]


@pytest.fixture(scope="module")
def cross(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The shared cross product, inline, with charts."""
    out = tmp_path_factory.mktemp("cross")
    done = run_ab(*CROSS, out=out, charts=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return Run(out, done, records_of(out))


@pytest.fixture(scope="module")
def w1_inline(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return ab_ok(*W1_SMALL, out=tmp_path_factory.mktemp("w1"))


# -- the options ----------------------------------------------------------------------------


def ab_parser() -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            parser: argparse.ArgumentParser = action.choices["ab"]
            return parser
    raise AssertionError("no subcommands")


def test_help_documents_every_option() -> None:
    # COLUMNS: no wrapping, help strings stay whole
    done = run_mtrremu("ab", "--help", timeout=120, env={"COLUMNS": "1000"})
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    actions = ab_parser()._actions
    options = [option for action in actions for option in action.option_strings]
    assert len(options) == len(set(options))
    assert set(options) >= {
        *("-h", "--help", "-w", "--workload", "-s", "--strategy", "--vcpus", "--memory"),
        *("--quirk", "--feature-mtrr", "--layout", "--seed", "--param", "--trace"),
        *("--save-traces", "--target", "--executor", "--out", "--no-charts", "--no-progress"),
    }
    for action in actions:
        assert action.option_strings, action.dest  # no positionals
        assert action.help, action.dest
        assert action.help != argparse.SUPPRESS, action.dest
        assert " ".join(action.help.split()) in text, action.dest
        for option in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    for name in WORKLOADS:
        assert f"{name} ({WORKLOADS[name].title})" in text
    assert "default: None" not in text and "default: False" not in text
    for action in actions:
        shown = ab_parser().formatter_class(prog="mtrremu ab")._get_help_string(action) or ""
        assert shown.replace("%(default)s", "").count("default") <= 1, action.dest
    for status in ("0 every run", "1 some run left stale", "2 the command line", "3 some run"):
        assert status in text


def test_refused_operations_are_counted_by_reason_and_strict_trace_fails_the_run(
    tmp_path: Path,
) -> None:
    base = build("W3", {"vcpus": 2})
    refused = (
        WriteMsr(0, 0x2FF, 0x300, host=True),  # reserved bits: KVM_SET_MSRS fails
        DetachDma(),  # 1 -> 0
        DetachDma(),  # none attached: FAILED_PRECONDITION
    )
    path = tmp_path / "refusing.jsonl"
    save(dataclasses.replace(base, items=(*base.items, *refused)), path)
    done = run_ab("--trace", str(path), "-s", "zap-all", out=tmp_path / "lenient")
    assert done.returncode == 0, done.stderr
    (record,) = records_of(tmp_path / "lenient")
    assert record["refused"] == {"FAILED_PRECONDITION": 1, "HOST_WRITE_REJECTED": 1}
    assert record["verdict"] == "clean" and record["failure"] is None
    assert "1 FAILED_PRECONDITION, 1 HOST_WRITE_REJECTED" in " ".join(done.stdout.split())
    strict = run_ab("--trace", str(path), "-s", "zap-all", "--strict-trace", out=tmp_path / "s")
    assert strict.returncode == 3, strict.stderr
    (record,) = records_of(tmp_path / "s")
    assert record["verdict"] == "failed"
    assert record["failure"]["kind"] == "refusals"
    assert record["counters"] == records_of(tmp_path / "lenient")[0]["counters"]


# -- files ----------------------------------------------------------------------------------


def test_a_run_prints_where_its_records_are(cross: Run) -> None:
    lines = cross.done.stdout.splitlines()
    assert f"JSON Lines: {cross.out / 'ab.jsonl'}" in lines
    assert f"CSV:        {cross.out / 'ab.csv'}" in lines
    assert f"charts:     {cross.out / 'charts'}/ (4 PNG)" in lines


def test_the_jsonl_holds_one_full_record_per_run(cross: Run) -> None:
    version = importlib.metadata.version("mtrremu")
    assert len(cross.records) == 8
    for r in cross.records:
        assert set(r) == RECORD_FIELDS
        assert r["schema"] == SCHEMA == "mtrremu.ab/2"
        assert r["workload"] == "W3"
        assert set(r["config"]) == CONFIG_FIELDS
        assert set(r["counters"]) == COUNTERS
        assert all(type(v) is int for v in r["counters"].values())
        assert r["counters"]["leaves_removed"] == sum(
            r["counters"][f"leaves_removed_{level}"] for level in ("4k", "2m", "1g")
        )
        assert r["counters"]["entries_visited"] == sum(
            r["counters"][f"entries_visited_{level}"] for level in ("root", "1g", "2m", "4k")
        )
        assert set(r["staleness"]) == {
            *("checks", "stale_points", "stale_leaves_max", "at_end"),
            *("event_checks", "stale_events", "stale_event_leaves_max", "excused"),
            "first_stale_event",
        }
        assert r["plugin"]["distribution"] == "mtrremu"
        assert r["plugin"]["version"] == r["mtrremu_version"] == version
        assert r["plugin"]["name"] == "mtrremu_strategies.series"
        assert r["profile"] == "6.7"
        assert (r["mode"], r["target"]) == ("in-process", None)
        assert r["published"] is None
        assert r["operations"] > 0
        assert isinstance(r["wall_seconds"], float)
        assert r["wall_seconds"] >= 0
        assert r["params"]["seed"] == r["seed"]
        assert r["params"]["vcpus"] == r["config"]["vcpus"]


def test_the_csv_has_a_row_per_run_with_the_same_counters(cross: Run) -> None:
    with (cross.out / "ab.csv").open(newline="") as source:
        rows = list(csv.reader(source))
    head = ["workload", "label", "strategy", "profile", "distribution", "version", "seed"]
    head += ["vcpus", "memory_bytes", "mode", "verdict", "failure", "refused", *sorted(COUNTERS)]
    head += ["stale_checks", "stale_points", "stale_leaves_max", "stale_at_end"]
    head += ["event_checks", "stale_events", "stale_event_leaves_max", "excused"]
    head += ["cycles_model", "cycles_work", "cycles_waiting", "cycles_yields", "cycles_basis"]
    head += ["wall_seconds"]
    assert rows[0] == head
    assert len(rows) == 1 + len(cross.records)
    for row, r in zip(rows[1:], cross.records, strict=True):
        cells = dict(zip(head, row, strict=True))
        assert {k: int(cells[k]) for k in COUNTERS} == r["counters"]
        assert cells["workload"] == r["workload"]
        assert cells["label"] == r["label"]
        assert cells["strategy"] == r["strategy"]
        assert cells["profile"] == r["profile"]
        assert cells["distribution"] == r["plugin"]["distribution"]
        assert cells["version"] == r["plugin"]["version"]
        assert int(cells["seed"]) == r["seed"]
        assert int(cells["vcpus"]) == r["config"]["vcpus"]
        assert int(cells["memory_bytes"]) == r["config"]["memory_bytes"]
        assert cells["mode"] == r["mode"]
        assert cells["verdict"] == r["verdict"] == "clean"
        assert float(cells["cycles_model"]) == r["cycles_model"]
        assert cells["cycles_basis"] == r["cycles_basis"] == "prediction"  # W3: none published
        assert cells["failure"] == cells["refused"] == ""
        staleness = r["staleness"]
        assert int(cells["stale_checks"]) == staleness["checks"]
        assert int(cells["stale_points"]) == staleness["stale_points"]
        assert int(cells["stale_leaves_max"]) == staleness["stale_leaves_max"]
        assert cells["stale_at_end"] == str(staleness["at_end"])
        assert int(cells["event_checks"]) == staleness["event_checks"]
        assert int(cells["stale_events"]) == staleness["stale_events"] == 0
        assert float(cells["wall_seconds"]) == r["wall_seconds"]


def test_charts_are_one_real_png_per_workload_and_configuration(cross: Run) -> None:
    charts = sorted((cross.out / "charts").iterdir())
    # One per (workload, label); the label leaves out the strategy.
    assert [p.name for p in charts] == [
        "W3-vcpus_2_seed_1.png",
        "W3-vcpus_2_seed_2.png",
        "W3-vcpus_3_seed_1.png",
        "W3-vcpus_3_seed_2.png",
    ]
    for path in charts:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, path.name
        assert len(data) > 10_000, path.name
        image = np.asarray(matplotlib.image.imread(path))
        # 15 inches wide at 100 dpi; three rows of panels (seven metrics, three a row), 1.6 +
        # 0.32 inches per strategy each.
        assert image.shape[:2] == (round(3 * 100 * (1.6 + 0.32 * 2)), 1500), path.name
        # RGBA floats in [0, 1]: pack each pixel's four bytes into one number.
        rgba = np.rint(image * 255).astype(np.uint32)
        packed = (rgba[..., 0] << 24) | (rgba[..., 1] << 16) | (rgba[..., 2] << 8) | rgba[..., 3]
        assert len(np.unique(packed)) > 32, path.name


def test_charts_are_skipped_with_no_charts(tmp_path: Path) -> None:
    done = run_ab("-w", "W3", "--vcpus", "2", "-s", "zap-all", out=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ab.jsonl").is_file()
    assert (tmp_path / "ab.csv").is_file()
    assert not (tmp_path / "charts").exists()
    assert "charts:" not in done.stdout


# -- reproducibility and the cross product --------------------------------------------------


def test_the_same_command_gives_the_same_records(cross: Run, tmp_path: Path) -> None:
    again = ab_ok(*CROSS, out=tmp_path)
    assert stable(again) == stable(cross.records)
    assert not (tmp_path / "charts").exists()


def test_the_cross_product_is_every_combination_in_order(cross: Run) -> None:
    expected = [
        (f"vcpus={vcpus} seed={seed}", strategy, vcpus, seed)
        for vcpus in (2, 3)
        for seed in (1, 2)
        for strategy in ("zap-all", "fine-grained")
    ]
    got = [(r["label"], r["strategy"], r["config"]["vcpus"], r["seed"]) for r in cross.records]
    assert got == expected
    # The seed reaches the trace: W3 has no bursts, so only params tell the seeds apart.
    assert [r["params"]["seed"] for r in cross.records] == [s for *_, s in expected]


def test_quirk_and_feature_mtrr_reach_the_vm(
    w1_inline: list[dict[str, Any]], tmp_path: Path
) -> None:
    records = ab_ok(
        *["-w", "W1", "--vcpus", "2", "--memory", "4G", "-s", "kvm-6.5"],
        *["--quirk", "off", "--quirk", "on", "--feature-mtrr", "off"],
        out=tmp_path,
    )
    assert [r["label"] for r in records] == [
        "vcpus=2 ram=4G quirk_cd_nw_cleared=False feature_mtrr=False seed=1",
        "vcpus=2 ram=4G quirk_cd_nw_cleared=True feature_mtrr=False seed=1",
    ]
    flags = [(r["config"]["quirk_cd_nw_cleared"], r["config"]["feature_mtrr"]) for r in records]
    assert flags == [(False, False), (True, False)]
    # The quirk changes what KVM 6.5 zaps: without it, CD flips zap as well.
    assert [r["counters"]["zap_events"] for r in records] == [22, 14]
    assert all(r["config"]["quirk_cd_nw_cleared"] for r in w1_inline)
    assert all(r["config"]["feature_mtrr"] for r in w1_inline)


def test_the_merged_layout_has_one_ram_slot_and_splitting_changes_nothing(
    tmp_path: Path,
) -> None:
    records = ab_ok(
        *["-w", "W1", "--vcpus", "2", "--memory", "4G", "-s", "fine-grained"],
        *["-s", "fine-grained-split", "--layout", "merged", "--layout", "default"],
        out=tmp_path,
    )
    by = {(r["label"].split()[2], r["strategy"]): r for r in records}
    assert len(by) == len(records) == 4
    merged = by["layout=merged", "fine-grained"]["config"]["memslots"]
    assert merged == [[0, 6 * GIB, "ram", "ram-merged"]]
    assert by["layout=merged", "fine-grained-split"]["config"]["memslots"] == merged
    default = by["layout=default", "fine-grained"]["config"]["memslots"]
    names = ["ram-below-vga", "ram-low", "vga-vram", "flash", "ram-high"]
    assert [slot[3] for slot in default] == names
    assert all(slot[2] == "ram" for slot in default)

    def work(layout: str, strategy: str) -> tuple[int, int, int]:
        c = by[f"layout={layout}", strategy]["counters"]
        return c["zap_events"], c["zaps_executed"], c["leaves_removed"]

    assert work("merged", "fine-grained-split") == work("merged", "fine-grained")
    # With the workload's own layout, splitting by memslot does change the zaps.
    assert work("default", "fine-grained-split") != work("default", "fine-grained")


def test_a_param_changes_the_params(cross: Run, tmp_path: Path) -> None:
    param = ["--param", "linux.touch_fraction=0.5"]
    records = ab_ok("-w", "W3", "--vcpus", "2", "-s", "zap-all", *param, out=tmp_path)
    assert len(records) == 1
    (r,) = records
    base = next(b for b in cross.records if b["label"] == "vcpus=2 seed=1")
    assert base["strategy"] == r["strategy"] == "zap-all"
    assert r["label"] == "vcpus=2 linux.touch_fraction=0.5 seed=1"
    assert r["params"]["linux"]["touch_fraction"] == 0.5
    assert base["params"]["linux"]["touch_fraction"] == 0.25
    assert {**r["params"], "linux": None} == {**base["params"], "linux": None}
    assert r["counters"]["faults"] > base["counters"]["faults"]


def test_an_unknown_param_is_refused_listing_the_known_ones(tmp_path: Path) -> None:
    done = run_ab("-w", "W3", "-s", "zap-all", "--param", "bogus=1", out=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    known = [f.name for f in dataclasses.fields(WORKLOADS["W3"].params) if f.name != "linux"]
    known += [f"linux.{f.name}" for f in dataclasses.fields(LinuxParams)]
    message = f"mtrremu: W3 has no parameter 'bogus'; known: {', '.join(sorted(known))}"
    assert done.stderr.splitlines() == [message]


def test_an_unknown_workload_is_refused_listing_the_known_ones(tmp_path: Path) -> None:
    done = run_ab("-w", "W9", "-s", "zap-all", out=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "mtrremu: unknown workload 'W9'; known: W1, W2, W3, W4, W5, W6, W7"
    ]
    assert not (tmp_path / "ab.jsonl").exists()


# -- executors and targets ------------------------------------------------------------------


def test_local_processes_give_the_same_records(cross: Run, tmp_path: Path) -> None:
    records = ab_ok(*CROSS, "--executor", "local:2", out=tmp_path)
    assert stable(records) == stable(cross.records)


def test_a_dask_cluster_gives_the_same_records(cross: Run, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        address: str = cluster.scheduler_address
        assert address.startswith("tcp://")
        # executor_for hands the text after dask:// to distributed.Client as is.
        records = ab_ok(
            *CROSS, "--executor", f"dask://{address.removeprefix('tcp://')}", out=tmp_path
        )
    assert stable(records) == stable(cross.records)


def test_a_spawned_server_gives_the_same_counts_and_saves_traces(
    w1_inline: list[dict[str, Any]], tmp_path: Path
) -> None:
    saved = tmp_path / "traces"
    done = run_ab(*W1_SMALL, "--target", "spawn", "--save-traces", str(saved), out=tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"traces written to {saved}/" in done.stdout
    assert "started a server on unix:" in done.stdout
    records = records_of(tmp_path / "o")
    assert [outcome(r) for r in records] == [outcome(r) for r in w1_inline]
    assert all(r["mode"] == "grpc" for r in records)
    assert all(r["target"].startswith("unix:") for r in records)
    assert all(r["staleness"]["checks"] > 0 for r in records)

    # One trace per (workload, parameters, seed), whatever the strategies.
    assert [p.name for p in saved.iterdir()] == ["W1-vcpus-2_ram-4G_seed-1.jsonl"]
    trace = load(saved / "W1-vcpus-2_ram-4G_seed-1.jsonl")
    assert trace == build("W1", {"vcpus": 2, "ram": 4 * GIB}, 1)
    assert trace.operations == w1_inline[0]["operations"]


def test_a_trace_file_replays_under_its_stem(cross: Run, tmp_path: Path) -> None:
    path = tmp_path / "my-boot.jsonl"
    save(build("W3", {"vcpus": 2}, 1), path)
    records = ab_ok("--trace", str(path), "-s", "zap-all", "-s", "fine-grained", out=tmp_path)
    assert [(r["workload"], r["label"], r["strategy"]) for r in records] == [
        ("my-boot", "seed=1", "zap-all"),
        ("my-boot", "seed=1", "fine-grained"),
    ]
    built = [r for r in cross.records if r["label"] == "vcpus=2 seed=1"]
    for r, base in zip(records, built, strict=True):
        assert r["strategy"] == base["strategy"]
        assert r["counters"] == base["counters"]
        assert r["staleness"] == base["staleness"]
        assert r["params"] == base["params"]
        assert r["config"] == base["config"]
        assert r["operations"] == base["operations"]
        assert r["mode"] == "in-process"


def test_a_missing_trace_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-trace.jsonl"
    done = run_ab("--trace", str(missing), "-s", "zap-all", out=tmp_path / "o")
    assert "Traceback" not in done.stderr
    assert done.returncode == 2
    assert str(missing) in done.stderr
