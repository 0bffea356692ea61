"""The ``mtrremu`` command, run as a real subprocess."""

from __future__ import annotations

from tests.helpers import run_mtrremu

run = run_mtrremu


def test_strategies_lists_every_builtin_with_its_distribution() -> None:
    done = run("strategies")
    assert done.returncode == 0, done.stderr
    for name in ("kvm-6.5", "kvm-6.7", "kvm-6.11", "zap-all", "fine-grained-split"):
        assert any(line.startswith(name + " ") for line in done.stdout.splitlines())
    assert "mtrremu 0.1.0" in done.stdout


def test_the_default_ab_job_reproduces_the_published_counts(tmp_path: object) -> None:
    done = run("ab", "--out", str(tmp_path), "--no-progress", "--no-charts")
    assert done.returncode == 0, done.stderr
    assert "84 =84" in done.stdout and "74 =74" in done.stdout
    assert "50 =50" in done.stdout and "42 =42" in done.stdout
    assert "≠" not in done.stdout.split("zap events:")[0]
    assert "verdict:    15 runs: 15 clean (exit status 0)" in done.stdout
    assert f"JSON Lines: {tmp_path}/ab.jsonl" in done.stdout


def test_an_unknown_strategy_is_a_clear_error_not_a_traceback() -> None:
    done = run("ab", "-w", "W3", "--strategy", "no-such-thing", "--no-progress")
    assert done.returncode == 2
    assert "unknown strategy 'no-such-thing'" in done.stderr
    assert "Traceback" not in done.stderr
