"""Loading installed plugins (docs/plugin-loading.md): every kind of broken plugin is reported
with its distribution while the others load, ``--strict``, block and only lists, hook tracing,
hook wrappers and ordering markers, the hookspec version, the default A/B strategy set, and a
server that starts and logs the fault."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from mtrremu.ab.runner import ALL, chosen_strategies, default_strategies
from mtrremu.core.config import VmConfig
from mtrremu.core.errors import (
    BY_REASON,
    BrokenPlugin,
    IncompatiblePlugin,
    InvalidArgument,
    PluginConflict,
)
from mtrremu.core.events import EventResult
from mtrremu.plugin import HOOKSPEC_VERSION, StrategySpec, hookimpl
from mtrremu.plugin.manager import ONLY_ENV, PluginManager, PluginSelection
from tests.helpers import ALL_STRATEGIES, run_mtrremu

_STRATEGY = """
from mtrremu.plugin import NO_ZAP, Profile, StrategySpec, hookimpl


class Noop:
    def on_mtrr_write(self, vm, vcpu, msr):
        return NO_ZAP

    def on_cd_toggle(self, vm, vcpu):
        return NO_ZAP

    def on_dma_transition(self, vm, attached):
        return NO_ZAP


def noop(name):
    return StrategySpec(name, "Never zaps.", Profile.KVM_6_7, lambda options: Noop())
"""

#: distribution -> (module, source after the common strategy code). Every distribution is
#: version 1.0 but ``good-plugin`` (2.0); the entry point is named after the module.
PLUGINS = {
    "good-plugin": ("good", "MTRREMU_HOOKSPEC_VERSION = 1\n\n@hookimpl\n"
                    "def mtrremu_strategies():\n    return [noop('good-noop')]\n"),
    "broken-import-plugin": ("bad_import", "import mtrremu_no_such_module\n"),
    "broken-validation-plugin": ("bad_validation", "@hookimpl\n"
                                 "def mtrremu_strategies(bogus):\n    return []\n"),
    "raising-plugin": ("bad_raise", "@hookimpl\n"
                       "def mtrremu_strategies():\n    raise RuntimeError('boom')\n"),
    "garbage-plugin": ("bad_garbage", "@hookimpl\n"
                       "def mtrremu_strategies():\n    return 'zap-all'\n"),
    "duplicate-plugin": ("bad_duplicate", "@hookimpl\n"
                         "def mtrremu_strategies():\n    return [noop('zap-all')]\n"),
    "future-plugin": ("bad_future", "MTRREMU_HOOKSPEC_VERSION = 99\n\n@hookimpl\n"
                      "def mtrremu_strategies():\n    return [noop('future-noop')]\n"),
}  # fmt: skip

#: distribution -> what ``mtrremu strategies`` says about it.
FAULTS = {
    "broken-import-plugin": "plugin 'bad_import' (broken-import-plugin 1.0) is broken: cannot "
    "import bad_import: ModuleNotFoundError: No module named 'mtrremu_no_such_module'",
    "broken-validation-plugin": "plugin 'bad_validation' (broken-validation-plugin 1.0) is "
    "broken: PluginValidationError: Plugin 'bad_validation' for hook 'mtrremu_strategies'",
    "raising-plugin": "plugin 'bad_raise' (raising-plugin 1.0) is broken: mtrremu_strategies: "
    "RuntimeError: boom",
    "garbage-plugin": "plugin 'bad_garbage' (garbage-plugin 1.0) is broken: "
    "mtrremu_strategies: TypeError: returned 'zap-all', not an iterable of StrategySpec",
    "duplicate-plugin": "strategy 'zap-all' is provided by both mtrremu_strategies.series "
    "(mtrremu ",
    "future-plugin": "plugin 'bad_future' (future-plugin 1.0) is broken: built for hookspec "
    "version 99; this mtrremu supports up to 1: upgrade mtrremu",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding every plugin of :data:`PLUGINS` as an installed distribution (module
    plus ``.dist-info`` with its entry point), to put on ``sys.path`` / ``PYTHONPATH``."""
    folder = tmp_path_factory.mktemp("site")
    for distribution, (module, body) in PLUGINS.items():
        (folder / f"{module}.py").write_text(_STRATEGY + body)
        version = "2.0" if distribution == "good-plugin" else "1.0"
        info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
        )
        (info / "entry_points.txt").write_text(f"[mtrremu]\n{module} = {module}\n")
    return folder


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """:func:`site` on this process's ``sys.path``."""
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module, _ in PLUGINS.values():
        sys.modules.pop(module, None)


def ours(**selection: object) -> PluginSelection:
    """A selection admitting only the test distributions (others may be installed)."""
    return PluginSelection(only=frozenset(PLUGINS), **selection)  # type: ignore[arg-type]


def strategies(site: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``mtrremu strategies FLAGS`` with :func:`site` installed."""
    return run_mtrremu("strategies", *flags, env={"PYTHONPATH": str(site), **env}, timeout=60)


# -- mtrremu strategies ----------------------------------------------------------------------


def test_strategies_lists_the_good_plugin_and_every_fault(site: Path) -> None:
    done = strategies(site)
    assert done.returncode == 0, done.stderr
    assert "good-noop            profile 6.7   good-plugin 2.0 (good)" in done.stdout
    listing, _, faults = done.stdout.partition("\nnot loaded (6):\n")
    for distribution, message in FAULTS.items():
        assert message in faults, distribution
        assert distribution in done.stderr  # each is logged as one warning line too
    assert "future-noop" not in listing
    listed = {line.split(" ", 1)[0] for line in listing.splitlines()}
    assert set(ALL_STRATEGIES) <= listed  # every built-in, whichever is listed first
    strict = strategies(site, "--strict")
    assert strict.returncode == 1
    assert strict.stdout == done.stdout


def test_block_list_from_flags_and_environment(site: Path) -> None:
    done = strategies(
        site,
        "--block-plugin",
        "Broken_Import.Plugin",
        "--block-plugin",
        "raising-plugin",
        MTRREMU_PLUGINS_BLOCK="garbage-plugin,duplicate-plugin",
    )
    assert done.returncode == 0, done.stderr
    faults, _, skipped = done.stdout.partition("\nnot loaded (2):\n")[2].partition("\nskipped")
    assert "future-plugin" in faults and "broken-validation-plugin" in faults
    for distribution in ("broken-import-plugin", "raising-plugin", "garbage", "duplicate"):
        assert f"{distribution}" in skipped and distribution not in faults
    assert "blocked (MTRREMU_PLUGINS_BLOCK / --block-plugin)" in skipped


def test_only_list_strict_and_hook_tracing(site: Path) -> None:
    done = strategies(site, "--strict", "--only-plugins", "good-plugin", "--trace-hooks")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "good-noop" in done.stdout and "not loaded" not in done.stdout
    assert done.stdout.count("not in the only-list (MTRREMU_PLUGINS_ONLY") >= len(FAULTS)
    trace = done.stderr.splitlines()
    assert "mtrremu.hooks: call mtrremu_strategies() -> [good]" in trace
    assert any(line.startswith("mtrremu.hooks:   mtrremu_strategies returned [[Strat")
               for line in trace)  # fmt: skip


def test_blocking_the_built_ins_is_a_usage_error(site: Path) -> None:
    done = strategies(site, "--block-plugin", "mtrremu")
    assert done.returncode == 2
    assert "the built-in distribution 'mtrremu' cannot be blocked" in done.stderr


def test_a_broken_plugin_never_stops_the_server(site: Path, tmp_path: Path) -> None:
    from mtrremu.client import Client  # noqa: PLC0415  (grpc only here)

    target = f"unix:{tmp_path / 'server.sock'}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mtrremu", "serve", "--listen", target, "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(site)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Client(target) as client:
            client.wait_ready(timeout=60)
            client.create_vm(VmConfig(), "good-noop")
            client.create_vm(VmConfig(), "zap-all")
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    for distribution, message in FAULTS.items():
        lines = [line for line in log.splitlines() if f"({distribution} " in line]
        assert lines and "WARNING mtrremu.plugin.manager: plugin not loaded: " in lines[0]
        if distribution != "duplicate-plugin":
            assert message in lines[0]


# -- the manager, in-process -----------------------------------------------------------------


def test_faulted_plugins_are_left_out_and_the_others_load(installed: Path) -> None:
    manager = PluginManager(selection=ours())
    assert {f.distribution for f in manager.faults} == set(FAULTS)
    assert manager.strategy("good-noop").distribution == "good-plugin"
    assert manager.strategy("zap-all").distribution == "mtrremu"
    assert "future-noop" not in {s.name for s in manager.strategies()}
    by_distribution = {f.distribution: f.error for f in manager.faults}
    assert isinstance(by_distribution["duplicate-plugin"], PluginConflict)
    assert type(by_distribution["future-plugin"]) is IncompatiblePlugin
    assert type(by_distribution["raising-plugin"]) is BrokenPlugin
    # A faulted plugin is unregistered: none of its hooks is ever called again.
    registered = {i.plugin_name for i in manager.hook.mtrremu_strategies.get_hookimpls()}
    assert "good" in registered and "bad_duplicate" not in registered


def test_strict_raises_the_first_fault(installed: Path) -> None:
    with pytest.raises((BrokenPlugin, PluginConflict)) as caught:
        PluginManager(selection=ours(), strict=True)
    assert any(message in str(caught.value) for message in FAULTS.values())


def test_incompatible_plugin_errors_are_registered() -> None:
    assert HOOKSPEC_VERSION == 1
    error = IncompatiblePlugin("p", "dist 1.0", "built for hookspec version 2")
    assert (error.status, error.reason) == ("FAILED_PRECONDITION", "PLUGIN_INCOMPATIBLE")
    assert BY_REASON["PLUGIN_BROKEN"] is BrokenPlugin
    assert BY_REASON["PLUGIN_INCOMPATIBLE"] is IncompatiblePlugin
    rebuilt = IncompatiblePlugin.from_metadata(str(error), error.metadata())
    assert isinstance(rebuilt, IncompatiblePlugin) and str(rebuilt) == str(error)


def test_selection_from_the_environment() -> None:
    selection = PluginSelection.from_environment(
        {
            "MTRREMU_PLUGINS_BLOCK": "A_b.c, ,x",
            "MTRREMU_PLUGINS_ONLY": "",
            "MTRREMU_TRACE_HOOKS": "yes",
        }
    )
    assert selection == PluginSelection(frozenset({"a-b-c", "x"}), frozenset(), True)
    assert selection.refusal("MTRREMU") is None  # the built-ins, always
    assert selection.refusal("other") is not None
    assert PluginSelection.from_environment({}) == PluginSelection()
    with pytest.raises(InvalidArgument, match="cannot be blocked"):
        PluginSelection(block=frozenset({"mtrremu"}))


# -- wrappers and ordering markers are honoured -----------------------------------------------


class DropShared:
    """A new-style wrapper of ``mtrremu_strategies``: hides every ``*-shared`` strategy."""

    @hookimpl(wrapper=True)
    def mtrremu_strategies(self) -> Generator[None, list[list[StrategySpec]], object]:
        results = yield
        return [[s for s in specs if not s.name.endswith("-shared")] for specs in results]


class Order:
    """Observer plugins appending their name to ``calls`` on each handled event."""

    calls: ClassVar[list[str]] = []

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def mtrremu_event_handled(self, vm_id: str, result: EventResult) -> None:
        Order.calls.append(self.__name__)


class Early(Order):
    @hookimpl(tryfirst=True)
    def mtrremu_event_handled(self, vm_id: str, result: EventResult) -> None:
        super().mtrremu_event_handled(vm_id, result)


class Plain(Order):
    @hookimpl
    def mtrremu_event_handled(self, vm_id: str, result: EventResult) -> None:
        super().mtrremu_event_handled(vm_id, result)


class OldStyleWrapper:
    """An old-style ``hookwrapper`` of the event hook, recording around the others."""

    @hookimpl(hookwrapper=True)
    def mtrremu_event_handled(self, vm_id: str, result: EventResult) -> Generator[None]:
        Order.calls.append("wrapper-before")
        yield
        Order.calls.append("wrapper-after")


def test_a_strategies_wrapper_is_honoured() -> None:
    names = {s.name for s in PluginManager(entry_points=False, plugins=[DropShared()]).strategies()}
    assert names == {n for n in ALL_STRATEGIES if not n.endswith("-shared")}


def test_ordering_markers_and_hookwrappers_of_observer_hooks_are_honoured() -> None:
    plugins = [Early("early"), Plain("plain"), OldStyleWrapper()]
    manager = PluginManager(entry_points=False, plugins=plugins)
    Order.calls.clear()
    manager.create_vm(VmConfig(), "zap-all").access(0, 0x1000)
    # Without tryfirst, "plain" (registered later) would run before "early".
    assert Order.calls == ["wrapper-before", "early", "plain", "wrapper-after"]


# -- the default A/B strategy set ------------------------------------------------------------


def test_installed_strategies_join_the_ab_job_only_with_all(
    installed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ONLY_ENV, "good-plugin")
    defaults = default_strategies()
    assert "good-noop" not in defaults
    assert chosen_strategies([]) == defaults
    everything = chosen_strategies([ALL, "lazy"])
    assert everything[: len(defaults)] == defaults
    assert "good-noop" in everything and "kvm-6.7" in everything
    assert len(everything) == len(set(everything))
    assert chosen_strategies(["good-noop"]) == ["good-noop"]
    assert "mutant-zaps-nothing" in default_strategies(("mtrremu.testing.mutants",))
