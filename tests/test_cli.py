"""The ``mtrremu`` command, run as a real subprocess."""

from __future__ import annotations

from mtrremu.core.units import MIB, TIB
from mtrremu.server.limits import Limits
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
    # Three workloads under the series' eight rows and our three experimental configurations.
    assert "verdict:    33 runs: 33 clean (exit status 0)" in done.stdout
    assert f"JSON Lines: {tmp_path}/ab.jsonl" in done.stdout


def test_an_unknown_strategy_is_a_clear_error_not_a_traceback() -> None:
    done = run("ab", "-w", "W3", "--strategy", "no-such-thing", "--no-progress")
    assert done.returncode == 2
    assert "unknown strategy 'no-such-thing'" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_help_shows_every_limit_with_its_default_and_unit() -> None:
    done = run_mtrremu("serve", "--help", timeout=120, env={"COLUMNS": "1000"})
    assert done.returncode == 0, done.stderr
    # Each option's entry runs from its name to the next option's (long names wrap their help).
    options = done.stdout.split("options:", 1)[1].split("\n\n", 1)[0]
    lines = {
        "--" + entry.split()[0]: " ".join(entry.split()) for entry in options.split("\n  --")[1:]
    }
    defaults = Limits()
    expected = {
        "--max-vms": f"(default: {defaults.max_vms})",
        "--max-vm-memory": "(default: 16T)",
        "--max-total-memory": "(default: 32T)",
        "--max-batch-operations": f"(default: {defaults.max_batch_operations})",
        "--max-message-bytes": "(default: 64M)",
        "--max-workers": "(default: 256)",
        "--grace": "(default: 5.0)",
    }
    for option, default in expected.items():
        assert default in lines[option], lines[option]
    assert defaults.max_vm_memory_bytes == 16 * TIB and defaults.max_message_bytes == 64 * MIB
    assert "SIZE is a byte count with an optional K, M, G or T suffix" in done.stdout
