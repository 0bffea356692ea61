"""mtrremu.testing's conformance suite, run as an author runs it (``pytest -p
mtrremu.testing.conformance --mtrremu-strategy NAME`` in a directory of its own): every
built-in strategy meets every guarantee it claims; every mutant of mtrremu.testing.mutants
fails, with a message naming what it got wrong; the example distribution
(plugins/examples/mtrremu-example-changed) passes and is served by name over gRPC."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from mtrremu import VmConfig
from mtrremu.client import Client
from mtrremu.plugin.manager import PluginManager
from mtrremu.testing.mutants import MUTANTS
from tests.helpers import ALL_STRATEGIES, PROFILE, run_command, serving

#: Random sequences and steps per stateful guarantee: few at a desk, more in CI.
EXAMPLES = {"quick": ("5", "15"), "ci": ("40", "30")}[PROFILE]
EXAMPLE = "example-changed"
EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "plugins/examples/mtrremu-example-changed"


def conformance(tmp_path: Path, *names: str, plugin: str | None = None) -> tuple[int, str]:
    examples, steps = EXAMPLES
    command = [sys.executable, "-m", "pytest", "-p", "mtrremu.testing.conformance"]
    command += ["-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(tmp_path)]
    command += ["--mtrremu-examples", examples, "--mtrremu-steps", steps]
    command += [arg for name in names for arg in ("--mtrremu-strategy", name)]
    if plugin:
        command += ["--mtrremu-plugin", plugin]
    done = run_command(*command, timeout=600)
    return done.returncode, done.stdout + done.stderr


def summary(output: str) -> dict[str, str]:
    """The terminal summary's line per strategy."""
    lines = output.split("guarantees per strategy", 1)[1].splitlines()
    return dict(
        (m.group(1), m.group(2)) for line in lines if (m := re.match(r"([\w.-]+): (.*)", line))
    )


def test_every_builtin_meets_every_guarantee_it_claims(tmp_path: Path) -> None:
    status, output = conformance(tmp_path, *ALL_STRATEGIES)
    assert status == 0, output[-4000:]
    verdicts = summary(output)
    assert sorted(verdicts) == sorted(ALL_STRATEGIES)
    for name, verdict in verdicts.items():
        assert "FAILED" not in verdict, (name, verdict)
        assert verdict.count(" met") == 4, (name, verdict)
    # What a declared gap excuses is reported as excused, never as met outright.
    assert "cd-toggle met, 10/20 excused by gaps" in verdicts["kvm-6.5"]
    assert verdicts["precise"] == "cd-toggle met; msr-validity met; events met; quiescence met"


def test_every_mutant_fails_naming_what_it_got_wrong(tmp_path: Path) -> None:
    status, output = conformance(tmp_path, *MUTANTS, plugin="mtrremu.testing.mutants")
    assert status == 1, output[-4000:]
    verdicts = summary(output)
    assert sorted(verdicts) == sorted(MUTANTS)
    for name, verdict in verdicts.items():
        assert "FAILED" in verdict, (name, verdict)
        # The assertion names the strategy and the stale leaves or the stale event.
        message = re.search(rf"AssertionError: {re.escape(name)}: .*stale.*", output)
        assert message is not None, f"no message names what {name} got wrong"
    # The strategy that never zaps: the message lists the stale leaves found.
    never = (
        r"AssertionError: mutant-zaps-nothing: .*\d+ stale leaves for vCPU 0: \w+ leaf at gpa 0x"
    )
    assert re.search(never, output), output[-4000:]


example_installed = pytest.mark.skipif(
    EXAMPLE not in {s.name for s in PluginManager().strategies()},
    reason=f"the example distribution is not installed: pip install -e {EXAMPLE_DIR}",
)


@example_installed
def test_the_example_distribution_passes(tmp_path: Path) -> None:
    status, output = conformance(tmp_path, EXAMPLE)
    assert status == 0, output[-4000:]
    assert summary(output)[EXAMPLE] == (
        "cd-toggle met; msr-validity met; events met; quiescence met"
    )


@example_installed
def test_the_example_is_selected_by_name_over_grpc() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        vm = client.create_vm(VmConfig(vcpus=1, noncoherent_dma=1), EXAMPLE)
        vm.write_msr(0, 0x2FF, 0xC06, host=True)  # WB default
        vm.write_cr0(0, 0x11)  # CD cleared: WB is WB either way under the quirk, no change
        vm.access(0, 0x1000)
        result = vm.write_msr(0, 0x2FF, 0xC00)  # UC default: every page changes type
        assert result.zap is not None and result.zap.zap_event
        zapped = [(r.start_gpa, r.end_gpa) for r in result.zap.requested]
        # Within the default memslot (not ZAP_ALL's 2^52 gfns), above the fixed ranges (UC).
        assert zapped == [(1 << 20, 4 << 30)]
        assert vm.staleness(0).stale_leaves == 0
