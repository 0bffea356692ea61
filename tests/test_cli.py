"""The ``mtrremu`` command, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtrremu.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_strategies_lists_every_builtin_with_its_distribution() -> None:
    done = run("strategies")
    assert done.returncode == 0, done.stderr
    for name in ("kvm-6.5", "kvm-6.7", "kvm-6.11", "zap-all", "fine-grained-split"):
        assert any(line.startswith(name + " ") for line in done.stdout.splitlines())
    assert "mtrremu 0.1.0" in done.stdout


def test_demo_prints_the_series_zap_counts() -> None:
    done = run("demo", "--vcpus", "4", "--strategy", "kvm-6.5", "--strategy", "zap-all")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:] if line}
    # Base1: 2 reset pushes x 4 vCPUs + 2 (BSP) + 3 x 2 (APs) + 4 x 2 (cache_cpu_init).
    assert rows["kvm-6.5"][1] == "24"
    # Base2: CD clears count, MTRR writes under CD=1 do not: 3 + 3 x 3 + 4 x 2.
    assert rows["zap-all"][1] == "20"
    assert rows["zap-all"][-1] == "0"


def test_an_unknown_strategy_is_a_clear_error_not_a_traceback() -> None:
    done = run("demo", "--strategy", "no-such-thing")
    assert done.returncode == 2
    assert "unknown strategy 'no-such-thing'" in done.stderr
    assert "Traceback" not in done.stderr
