"""The timing model and patch 12's shared-lock zap. The calibration figures are the cover
letter's published cycles (calibration); every other expected number is derived here from the
model's rules (prediction)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from mtrremu.ab.runner import RunSpec, run
from mtrremu.core.ept import EptStore, encode_leaf
from mtrremu.core.memtype import WB_NO_IPAT
from mtrremu.core.strategy import MmuLock
from mtrremu.core.timing import CycleCosts, ZapCall, round_cycles
from mtrremu.core.units import GfnRange, Level
from tests.helpers import run_command

ROOT = Path(__file__).resolve().parents[1]
UNIT = CycleCosts(entry=1.0, leaf=0.0, flush=0.0, spin=0.5, list_op=0.0, handoff=1.0)


def call(entries: int, waited: bool = False) -> ZapCall:
    return ZapCall(entries, 0, 0, 0, waited)


# -- the rules, on hand-made rounds ---------------------------------------------------------


def test_a_call_alone_costs_its_work() -> None:
    cycles = round_cycles([call(100)], UNIT, MmuLock.WRITE)
    assert (cycles.work, cycles.waiting, cycles.yields) == (100, 0, 0)


def test_two_equal_writers_share_the_lock_and_pay_a_handoff_per_entry() -> None:
    # Each has 100 entries: contended demand 200 each, shared round-robin: both finish at 400.
    cycles = round_cycles([call(100), call(100)], UNIT, MmuLock.WRITE)
    assert (cycles.work, cycles.yields, cycles.total) == (200, 200, 800)
    assert cycles.waiting == 400


def test_a_short_writer_leaves_and_the_long_one_finishes_alone() -> None:
    # Demands 20 and 200 at half rate: the short one finishes at 40, having let the long one
    # do 40 / 400 = 1/10 of its contended demand; the rest (9/10 of 100) runs uncontended.
    cycles = round_cycles([call(10), call(100)], UNIT, MmuLock.WRITE)
    assert cycles.total == pytest.approx(40 + 40 + 90)
    assert cycles.yields == pytest.approx(10 + 10)


def test_readers_run_side_by_side() -> None:
    cycles = round_cycles([call(100)] * 8, UNIT, MmuLock.READ)
    assert (cycles.total, cycles.waiting) == (800, 0)


def test_list_waiters_wait_for_the_drain_and_a_write_drainer_yields_to_them() -> None:
    drainer, waiters = call(100), [call(0, waited=True)] * 3
    write = round_cycles([drainer, *waiters], UNIT, MmuLock.WRITE)
    assert write.yields == 50  # spin 0.5 per entry the drainer visits
    assert write.waiting == 3 * 150
    read = round_cycles([drainer, *waiters], UNIT, MmuLock.READ)
    assert (read.yields, read.waiting) == (0, 3 * 100)


# -- the model on workloads: the directions the series' mechanism implies ----------------------


def modelled(workload: str, strategy: str, **params: Any) -> dict[str, Any]:
    record = run(RunSpec(workload, strategy, overrides=tuple(params.items())))
    assert record["verdict"] == "clean"
    return record


def test_more_vcpus_wait_longer_under_base2_and_not_under_patch_12() -> None:
    small = modelled("W2", "zap-all", vcpus=4)
    large = modelled("W2", "zap-all", vcpus=16)
    assert large["cycles_parts"]["waiting"] > 2 * small["cycles_parts"]["waiting"] > 0
    assert large["cycles_model"] > small["cycles_model"]
    assert large["cycles_basis"] == small["cycles_basis"] == "prediction"
    shared = modelled("W2", "zap-all-shared", vcpus=16)
    assert shared["cycles_parts"]["waiting"] == shared["cycles_parts"]["yields"] == 0
    assert shared["cycles_model"] < large["cycles_model"] / 10


def test_a_bigger_guest_costs_more_to_zap_all() -> None:
    small = modelled("W4", "zap-all", vcpus=16, ram=1536 << 30)
    large = modelled("W4", "zap-all", vcpus=16, ram=12 << 40)
    assert large["counters"]["entries_visited"] > 4 * small["counters"]["entries_visited"]
    assert large["cycles_model"] > 4 * small["cycles_model"]


def test_the_published_setups_are_calibration_and_the_rest_predictions() -> None:
    assert modelled("W1", "zap-all")["cycles_basis"] == "calibration"
    assert modelled("W1", "precise")["cycles_basis"] == "prediction"


def test_the_shipped_costs_meet_the_calibration_targets() -> None:
    done = run_command(sys.executable, str(ROOT / "scripts" / "fit_cycles.py"), "--check")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    fields = dict(item.split("=") for item in lines[-1].split())
    assert (fields["rows"], fields["params"]) == ("16", "6")
    assert float(fields["max_abs_log_err"]) <= 0.69
    assert float(fields["median_abs_log_err"]) <= 0.3
    assert "OVMF: 0 pairs of rows ordered unlike the published cycles" in lines


# -- patch 12's zap ------------------------------------------------------------------------------


def test_a_shared_zap_drops_covered_subtrees_whole_and_leaves_straddling_huge_leaves() -> None:
    store = EptStore()
    byte = encode_leaf(WB_NO_IPAT)
    for gfn in range(0, 512, 1):  # 512 4 KiB leaves in [0, 2 MiB)
        store.install(gfn, Level.K4, byte)
    store.install(512, Level.M2, byte)  # a 2 MiB leaf at [2, 4) MiB
    outcome = store.zap_shared(GfnRange(0, 512 + 256))  # ends inside the 2 MiB leaf
    # The level-2 entry for [0, 2 MiB) is covered: its table (512 leaves) goes in one piece.
    assert outcome.removed[Level.K4] == 512
    assert outcome.entries_zapped == 1
    assert outcome.straddling_skipped == 1
    assert store.leaf_counts() == {Level.G1: 0, Level.M2: 1, Level.K4: 0}
    assert store.lookup(0).zapped
    # The root and the level-3 entry are walked, then [0, 4 MiB) of the level-2 table.
    assert outcome.visited[Level.ROOT] == 1 and outcome.visited[Level.G1] == 1
    assert outcome.visited[Level.M2] == 2 and outcome.visited[Level.K4] == 0
