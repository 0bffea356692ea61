"""The workloads have detection power: every deliberately broken strategy of
:mod:`mtrremu.testing.mutants` is STALE on the default job, the built-in ones are not, and
``mtrremu ab`` says so with its exit status.

Which workload catches what is predicted from the traces, not read off a run: only W7 has a DMA
transition, so only W7 can catch the mutant that forgets it; a direct kernel boot (W3) never
changes any page's type (the VMM's MTRRs are all WB), so not even the mutant that zaps nothing
is wrong there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrremu.ab.runner import DEFAULT_WORKLOADS, RunSpec, run
from mtrremu.testing.mutants import MUTANTS
from tests.helpers import ALL_STRATEGIES, SERIES, run_ab

PLUGIN = "mtrremu.testing.mutants"


def verdicts(strategy: str, workloads: tuple[str, ...] = DEFAULT_WORKLOADS) -> dict[str, str]:
    return {w: run(RunSpec(w, strategy, plugins=(PLUGIN,)))["verdict"] for w in workloads}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_mutant_is_stale_on_the_default_job(mutant: str) -> None:
    found = verdicts(mutant)
    assert "stale" in found.values(), found
    assert "failed" not in found.values()
    if mutant == "mutant-forgets-dma":
        assert found == {"W1": "clean", "W2": "clean", "W7": "stale"}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_the_built_in_strategies_are_clean_on_the_default_job(strategy: str) -> None:
    assert set(verdicts(strategy).values()) == {"clean"}


def test_a_direct_boot_changes_no_type_so_even_zapping_nothing_is_right() -> None:
    assert verdicts("mutant-zaps-nothing", ("W3",)) == {"W3": "clean"}


def test_the_released_kernels_gap_is_excused_by_name_not_hidden() -> None:
    record = run(RunSpec("W1", "kvm-6.5"))
    assert record["verdict"] == "clean"
    assert record["staleness"]["excused"]["cd-toggle"] > 0
    for strategy in SERIES:
        assert run(RunSpec("W1", strategy))["staleness"]["excused"] == {}


def test_ab_exits_1_on_stale_runs_unless_allowed(tmp_path: Path) -> None:
    args = ["-w", "W2", "--plugin", PLUGIN, "-s", "zap-all", "-s", "mutant-zaps-nothing"]
    done = run_ab(*args, out=tmp_path / "a")
    assert done.returncode == 1, done.stderr
    assert " STALE  mutant-zaps-nothing on W2 OVMF" in done.stdout
    assert "exit status 1" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "a" / "ab.jsonl").open()]
    assert [r["verdict"] for r in records] == ["clean", "stale"]
    allowed = run_ab(*args, "--allow-stale", out=tmp_path / "b")
    assert allowed.returncode == 0, allowed.stderr
    assert "exit status 0" in allowed.stdout
