"""The soak script end to end: a short run against a real ``mtrremu serve`` subprocess (mixed
and misbehaving load, idle streams over three clients, kill -9 and restart from the state
directory, a graceful restart) meets every target its last line reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
LAST_LINE = re.compile(
    r"ops=(?P<ops>\d+) errors_unexpected=(?P<errors>\d+) health_p99_ms=(?P<p99>[0-9.]+|inf) "
    r"lost_vms=(?P<lost_vms>\d+) lost_leaves=(?P<lost_leaves>\d+) stale=(?P<stale>\d+) "
    r"peak_rss_mib=(?P<rss>\d+)"
)


def test_a_short_soak_meets_its_targets() -> None:
    """Few threads (the server saturated by 64 on two shared cores answers health checks at
    a p99 close to the 100 ms target); the idle streams still exceed the per-client cap."""
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--seconds",
            "5",
            "--threads",
            "8",
            "--idle-streams",
            "128",
            "--seed",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    output = done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, output
    last = LAST_LINE.fullmatch(lines[-1])
    assert last is not None, output
    assert int(last["ops"]) > 1000, output
    assert int(last["errors"]) == 0, output
    assert float(last["p99"]) <= 100, output
    assert int(last["lost_vms"]) == 0, output
    assert int(last["lost_leaves"]) == 0, output
    assert int(last["stale"]) == 0, output
    assert int(last["rss"]) > 0, output
    assert done.returncode == 0, output
    # What the run must have gone through: the kill and both restarts, with every VM back,
    # and the per-client stream cap refusing some of the idle streams. (The summary is
    # wrapped at 100 columns wherever its numbers put the breaks.)
    output = " ".join(output.split())
    assert re.search(r"kill -9 at [0-9.]+ s of load: 8 snapshot files \(8 of the fleet", output)
    assert "after kill -9: 8 VMs expected back, 0 missing" in output, output
    assert "after SIGTERM and restart: 8 VMs expected back, 0 missing" in output, output
    assert "idle streams refused (per client cap)" in output, output
