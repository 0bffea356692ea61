"""The conformance suite as a pytest plugin: does a zap strategy leave memory types right?

Enable it in a ``conftest.py`` (or with ``-p mtrremu.testing.conformance``) and name the
strategies to judge, installed or in a module given with ``--mtrremu-plugin``::

    pytest_plugins = ["mtrremu.testing.conformance"]

    pytest --mtrremu-strategy my-strategy   # or, in pytest's ini: mtrremu_strategies = ...

Every strategy named runs four guarantees (docs/plugins.md#the-conformance-suite):

``cd-toggle``      a guest CR0.CD toggle in each of the seed patch's 20 table cells leaves
                   nothing stale for the toggling vCPU
``msr-validity``   a guest MSR write KVM refuses (#GP) changes nothing and zaps nothing
``events``         property (2): in random guest and host operation sequences, no event leaves
                   leaves newly stale for its vCPU beyond the strategy's declared gaps
``quiescence``     property (1): once every vCPU holds the same MTRRs and CR0.CD, nothing is
                   stale (for a strategy declaring gaps: after every vCPU reprograms them as
                   firmware does)

A case a declared gap excuses is skipped, naming the gap ("not claimed"). The terminal summary
lists, per strategy, which guarantees it meets. Random sequences are seeded: the same options
give the same examples every run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from mtrremu.plugin.manager import PluginManager

#: The module holding the suite's tests.
SUITE = Path(__file__).with_name("conformance_suite.py")
#: Guarantee name → (test function, what it promises), in report order.
GUARANTEES = {
    "cd-toggle": ("test_cd_toggle_leaves_nothing_stale", "seed-table CD toggles"),
    "msr-validity": ("test_refused_write_changes_nothing", "refused MSR writes"),
    "events": ("test_no_event_leaves_its_vcpu_stale", "no newly stale leaf after an event"),
    "quiescence": ("test_nothing_stale_at_quiescence", "no stale leaf at quiescence"),
}
_BY_FUNCTION = {function: name for name, (function, _) in GUARANTEES.items()}
_MANAGER = pytest.StashKey[PluginManager]()
_RECORDER = pytest.StashKey["_Recorder"]()
DEFAULT_EXAMPLES = 10
DEFAULT_STEPS = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mtrremu", "mtrremu conformance suite")
    group.addoption(
        "--mtrremu-strategy",
        action="append",
        default=[],
        metavar="NAME",
        help="a zap strategy to run the conformance suite on (repeatable)",
    )
    group.addoption(
        "--mtrremu-plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="register a strategy plugin module that is not installed (repeatable)",
    )
    group.addoption(
        "--mtrremu-examples",
        type=int,
        default=None,
        metavar="N",
        help=f"random sequences per stateful guarantee (default {DEFAULT_EXAMPLES})",
    )
    group.addoption(
        "--mtrremu-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"operations per random sequence at most (default {DEFAULT_STEPS})",
    )
    parser.addini("mtrremu_strategies", "strategies to run the conformance suite on", "linelist")
    parser.addini("mtrremu_plugins", "strategy plugin modules that are not installed", "linelist")


def strategy_names(config: pytest.Config) -> list[str]:
    names: list[str] = [*config.getoption("mtrremu_strategy"), *config.getini("mtrremu_strategies")]
    return list(dict.fromkeys(names))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mtrremu_conformance: a test of the mtrremu conformance suite"
    )
    names = strategy_names(config)
    if not names:
        return
    modules = [*config.getoption("mtrremu_plugin"), *config.getini("mtrremu_plugins")]
    manager = PluginManager(modules=list(dict.fromkeys(modules)))
    known = {s.name for s in manager.strategies()}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise pytest.UsageError(
            f"mtrremu conformance: unknown strategy {', '.join(unknown)}; installed: "
            f"{', '.join(sorted(known))} (a module that is not installed: --mtrremu-plugin)"
        )
    config.stash[_MANAGER] = manager
    recorder = _Recorder()
    config.stash[_RECORDER] = recorder
    config.pluginmanager.register(recorder, "mtrremu-conformance-recorder")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Add the suite's tests (before ``-k`` and ``-m`` select) when strategies are named."""
    if _MANAGER not in config.stash:
        return
    module = pytest.Module.from_parent(session, path=SUITE)
    suite = [node for node in session.genitems(module) if isinstance(node, pytest.Item)]
    for item in suite:
        item.add_marker("mtrremu_conformance")
        callspec = getattr(item, "callspec", None)
        strategy = callspec.params.get("mtrremu_strategy", "") if callspec else ""
        function = getattr(item, "originalname", item.name)
        item.user_properties.append(("mtrremu_strategy", strategy))
        item.user_properties.append(("mtrremu_guarantee", _BY_FUNCTION.get(function, function)))
    items[:0] = suite


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mtrremu_strategy" in metafunc.fixturenames and _MANAGER in metafunc.config.stash:
        names = strategy_names(metafunc.config)
        metafunc.parametrize("mtrremu_strategy", names, ids=names)


@pytest.fixture(scope="session")
def mtrremu_manager(pytestconfig: pytest.Config) -> PluginManager:
    """The plugin manager the suite builds VMs with (installed strategies and
    ``--mtrremu-plugin`` modules)."""
    return pytestconfig.stash[_MANAGER]


@pytest.fixture(scope="session")
def mtrremu_settings(pytestconfig: pytest.Config) -> settings:
    """Hypothesis settings of the stateful guarantees: seeded, so a failure reproduces."""
    examples = pytestconfig.getoption("mtrremu_examples") or DEFAULT_EXAMPLES
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="session")
def mtrremu_steps(pytestconfig: pytest.Config) -> int:
    steps: int | None = pytestconfig.getoption("mtrremu_steps")
    return steps or DEFAULT_STEPS


class _Recorder:
    """Counts outcomes per (strategy, guarantee) for the terminal summary."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if "mtrremu_guarantee" not in props:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            key = (str(props["mtrremu_strategy"]), str(props["mtrremu_guarantee"]))
            self.counts[key][report.outcome] += 1

    def lines(self, names: list[str]) -> Iterator[str]:
        for name in names:
            parts = []
            for guarantee in GUARANTEES:
                counts = self.counts.get((name, guarantee))
                if not counts:
                    continue
                total = sum(counts.values())
                if counts.get("failed"):
                    parts.append(f"{guarantee} FAILED ({counts['failed']}/{total})")
                elif counts.get("skipped"):
                    parts.append(f"{guarantee} met, {counts['skipped']}/{total} excused by gaps")
                else:
                    parts.append(f"{guarantee} met")
            if parts:
                yield f"{name}: {'; '.join(parts)}"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    if _RECORDER not in config.stash:
        return
    lines = list(config.stash[_RECORDER].lines(strategy_names(config)))
    if lines:
        terminalreporter.write_sep("=", "mtrremu conformance: guarantees per strategy")
        for line in lines:
            terminalreporter.write_line(line)
