"""A broken strategy is the plugin's bug, never the emulator's crash: it is reported with its
hook and cause, the VM stays consistent (a zap of everything replaces the failed answer), and
an A/B job records a FAILED run while the other runs finish — in-process, over gRPC and through
``mtrremu ab`` as a real subprocess (``tests/broken_strategies.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtrremu.client import Client
from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.errors import BrokenStrategy
from mtrremu.core.memtypes import MemType
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager
from tests.broken_strategies import HOOKS
from tests.helpers import CD0, CD1, GIB, gfn, gpa, run_ab, serving, set_deftype, set_var

PLUGIN = "tests.broken_strategies"
MANAGER = PluginManager(entry_points=False, modules=(PLUGIN,))
RUNTIME = [name for name, hook in HOOKS.items() if hook != "factory"]
FACTORY = [name for name, hook in HOOKS.items() if hook == "factory"]
PAGE = gfn(3 * GIB)


def uc_hole(strategy: str) -> Vm:
    """A UC range over [3 GiB, 4 GiB), CD=0, one UC leaf faulted there."""
    vm = MANAGER.create_vm(VmConfig(noncoherent_dma=1, track_staleness=True), strategy)
    set_var(vm, 0, 0, 3 * GIB, GIB, MemType.UC)
    set_deftype(vm, 0, 0xC06)
    vm.write_cr0(0, CD0, host=True)
    vm.access(0, gpa(PAGE))
    return vm


@pytest.mark.parametrize("strategy", RUNTIME)
def test_a_failing_call_is_reported_and_replaced_by_a_zap_of_everything(strategy: str) -> None:
    vm = uc_hole(strategy)
    result = vm.write_cr0(0, CD1)  # a CD toggle: the strategy's on_cd_toggle fails
    failure = result.strategy_failure
    assert failure is not None and failure.hook == HOOKS[strategy]
    assert failure.error.startswith(("raised KeyError", "returned None", "raised TypeError"))
    assert result.counters.strategy_failures == 1
    assert result.counters.zaps_executed == 1 and result.counters.leaves_removed == 1
    assert vm.store.leaf_total == 0
    # The fallback zap left nothing stale for the acting vCPU, at once or at quiescence.
    assert vm.stale(0).clean
    assert vm.staleness.stale_events == 0
    assert vm.counters_snapshot().strategy_failures == 1
    # The VM goes on: the next event works and is counted.
    assert vm.write_msr(0, msrs.PAT, msrs.PAT_DEFAULT).gp is None


@pytest.mark.parametrize("strategy", FACTORY)
def test_a_broken_factory_fails_at_creation_naming_the_plugin(strategy: str) -> None:
    with pytest.raises(BrokenStrategy) as caught:
        MANAGER.create_vm(VmConfig(), strategy)
    error = caught.value
    assert error.strategy == strategy
    assert "(unpackaged), plugin tests.broken_strategies" in str(error)
    expected = "factory raised RuntimeError" if strategy == "broken-factory" else "lacks"
    assert expected in error.why
    if strategy == "broken-no-dma":
        assert "on_dma_transition" in error.why


# -- over gRPC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with serving(plugins=(PLUGIN,)) as server, Client(server.addresses[0]) as connected:
        yield connected


def test_a_broken_factory_is_failed_precondition_with_its_metadata(client: Client) -> None:
    with pytest.raises(BrokenStrategy) as caught:
        client.create_vm(VmConfig(), "broken-factory")
    assert caught.value.strategy == "broken-factory"
    assert "RuntimeError: cannot open the config file" in caught.value.why
    assert client.list_vms() == []


def test_a_failing_call_over_grpc_reports_the_hook_and_goes_on(client: Client) -> None:
    vm = client.create_vm(VmConfig(noncoherent_dma=1), "broken-raises")
    try:
        vm.write_msr(0, msrs.DEFTYPE, 0xC06, host=True)
        vm.write_cr0(0, CD0, host=True)
        vm.access(0, gpa(PAGE))
        outcome = vm.write_cr0(0, CD1)
        assert outcome.strategy_failure.hook == "on_cd_toggle"
        assert "KeyError" in outcome.strategy_failure.error
        assert outcome.counters.strategy_failures == 1
        assert vm.counters().strategy_failures == 1
        assert vm.staleness().stale_leaves == 0
    finally:
        vm.delete()


# -- through mtrremu ab --------------------------------------------------------------------------


def test_ab_records_failed_runs_and_finishes_the_others(tmp_path: Path) -> None:
    strategies = ["-s", "broken-raises", "-s", "broken-factory", "-s", "zap-all"]
    done = run_ab("-w", "W3", "--vcpus", "2", "--plugin", PLUGIN, *strategies, out=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    records = [json.loads(line) for line in (tmp_path / "ab.jsonl").open()]
    by = {r["strategy"]: r for r in records}
    assert by["zap-all"]["verdict"] == "clean" and by["zap-all"]["failure"] is None
    raised = by["broken-raises"]
    assert raised["verdict"] == "failed"
    assert raised["failure"]["kind"] == "strategy"
    assert raised["failure"]["hook"] == "on_cd_toggle"
    assert "KeyError" in raised["failure"]["error"]
    assert raised["counters"]["strategy_failures"] > 0
    factory = by["broken-factory"]
    assert (factory["failure"]["kind"], factory["failure"]["hook"]) == ("strategy", "factory")
    assert factory["plugin"]["name"] == PLUGIN
    assert (tmp_path / "ab.csv").is_file()
    assert "FAILED" in done.stdout and "exit status 3" in done.stdout


def test_an_installed_broken_plugin_does_not_stop_the_default_strategy_set(
    tmp_path: Path,
) -> None:
    done = run_ab("-w", "W3", "--vcpus", "2", "--plugin", PLUGIN, out=tmp_path, charts=True)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    records = [json.loads(line) for line in (tmp_path / "ab.jsonl").open()]
    verdicts = {r["strategy"]: r["verdict"] for r in records}
    assert {verdicts[name] for name in HOOKS} == {"failed"}
    assert {v for name, v in verdicts.items() if name not in HOOKS} == {"clean"}
    assert len(list((tmp_path / "charts").glob("*.png"))) == 1
