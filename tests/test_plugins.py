"""The plugin layer: built-in registration, strategy selection by name, options, conflicts,
third-party discovery through the ``mtrremu`` entry-point group, observer hooks, and the
guarantee that importing the package pulls in no gRPC."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from mtrremu.core.config import VmConfig
from mtrremu.core.ept import ZapOutcome
from mtrremu.core.errors import BrokenPlugin, InvalidArgument, PluginConflict, UnknownStrategy
from mtrremu.core.events import EventResult
from mtrremu.core.observer import NULL_OBSERVER
from mtrremu.core.units import ZAP_ALL, GfnRange
from mtrremu.plugin import (
    Profile,
    StrategySpec,
    ZapStrategy,
    hookimpl,
)
from mtrremu.plugin.manager import PluginManager, PluginSelection
from mtrremu.testing.mutants import ZapsNothing
from tests.helpers import ALL_STRATEGIES, CD0, SERIES, gpa, leaves, run_command

KVM_RELEASES = "mtrremu_strategies.kvm_releases"
SERIES_PLUGIN = "mtrremu_strategies.series"
EXPERIMENTAL_PLUGIN = "mtrremu_strategies.experimental"

#: name -> (registering plugin, profile, class of the strategy object its factory builds)
BUILTINS: dict[str, tuple[str, Profile, str]] = {
    "kvm-6.5": (KVM_RELEASES, Profile.KVM_6_5, "ReleasedKvm"),
    "kvm-6.7": (KVM_RELEASES, Profile.KVM_6_7, "ReleasedKvm"),
    "kvm-6.11": (KVM_RELEASES, Profile.KVM_6_11, "NoMtrrVirtualisation"),
    "zap-all": (SERIES_PLUGIN, Profile.KVM_6_7, "ZapAll"),
    "zap-all-serialized": (SERIES_PLUGIN, Profile.KVM_6_7, "ZapAllSerialized"),
    "fine-grained": (SERIES_PLUGIN, Profile.KVM_6_7, "FineGrained"),
    "fine-grained-split": (SERIES_PLUGIN, Profile.KVM_6_7, "FineGrainedSplit"),
    "zap-all-shared": (SERIES_PLUGIN, Profile.KVM_6_7, "ZapAll"),
    "fine-grained-shared": (SERIES_PLUGIN, Profile.KVM_6_7, "FineGrained"),
    "fine-grained-split-shared": (SERIES_PLUGIN, Profile.KVM_6_7, "FineGrainedSplit"),
    "precise": (EXPERIMENTAL_PLUGIN, Profile.KVM_6_7, "Precise"),
    "lazy": (EXPERIMENTAL_PLUGIN, Profile.KVM_6_7, "Lazy"),
}

THIRDPARTY_MODULE = "thirdparty_mtrremu_plugin"
THIRDPARTY_SOURCE = '''\
"""A third-party mtrremu plugin: one strategy that never zaps."""

from mtrremu.plugin import NO_ZAP, Profile, StrategySpec, hookimpl


class Noop:
    def on_mtrr_write(self, vm, vcpu, msr):
        return NO_ZAP

    def on_cd_toggle(self, vm, vcpu):
        return NO_ZAP

    def on_dma_transition(self, vm, attached):
        return NO_ZAP


@hookimpl
def mtrremu_strategies():
    return [
        StrategySpec("experimental-noop", "Never zaps.", Profile.KVM_6_7, lambda options: Noop())
    ]
'''


# -- test plugins ----------------------------------------------------------------------------


#: A strategy that never zaps.
Inert = ZapsNothing


class RecordingFactory:
    """A strategy factory remembering the options it got and the objects it built."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.built: list[ZapStrategy] = []

    def __call__(self, options: Mapping[str, str]) -> ZapStrategy:
        self.calls.append(dict(options))
        strategy = Inert()
        self.built.append(strategy)
        return strategy


class SpecPlugin:
    """A plugin object whose ``mtrremu_strategies`` returns ``records`` as given."""

    def __init__(self, name: str, records: object) -> None:
        self.__name__ = name  # pluggy's canonical plugin name
        self._records = records

    @hookimpl
    def mtrremu_strategies(self) -> object:
        return self._records


class Recorder:
    """An observer plugin recording every observer-hook call."""

    def __init__(self) -> None:
        self.zaps: list[tuple[str, GfnRange, ZapOutcome]] = []
        self.faults: list[tuple[str, int, EventResult]] = []
        self.handled: list[tuple[str, EventResult]] = []

    @hookimpl
    def mtrremu_zap_executed(self, vm_id: str, rng: GfnRange, outcome: ZapOutcome) -> None:
        self.zaps.append((vm_id, rng, outcome))

    @hookimpl
    def mtrremu_fault(self, vm_id: str, vcpu: int, result: EventResult) -> None:
        self.faults.append((vm_id, vcpu, result))

    @hookimpl
    def mtrremu_event_handled(self, vm_id: str, result: EventResult) -> None:
        self.handled.append((vm_id, result))

    def clear(self) -> None:
        self.zaps.clear()
        self.faults.clear()
        self.handled.clear()


class Misspelt:
    """Implements a hook that does not exist (singular ``mtrremu_strategy``)."""

    @hookimpl
    def mtrremu_strategy(self) -> Iterable[StrategySpec]:
        return []


def spec(name: str, factory: RecordingFactory | None = None, **options: str) -> StrategySpec:
    return StrategySpec(
        name, f"test strategy {name}", Profile.KVM_6_7, factory or RecordingFactory(), options
    )


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager(entry_points=False)


@pytest.fixture
def thirdparty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed-looking distribution ``thirdparty-mtrremu-plugin 1.2.3`` on ``sys.path``."""
    (tmp_path / f"{THIRDPARTY_MODULE}.py").write_text(THIRDPARTY_SOURCE)
    info = tmp_path / f"{THIRDPARTY_MODULE}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-mtrremu-plugin\nVersion: 1.2.3\n"
    )
    (info / "entry_points.txt").write_text(f"[mtrremu]\nnoop = {THIRDPARTY_MODULE}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(THIRDPARTY_MODULE, None)


# -- built-in strategies ---------------------------------------------------------------------


def test_builtin_strategy_names(manager: PluginManager) -> None:
    assert [s.name for s in manager.strategies()] == sorted(ALL_STRATEGIES)
    assert [s.name for s in manager.strategies()] == sorted(BUILTINS)


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_builtin_strategy_provenance(manager: PluginManager, name: str) -> None:
    registered = manager.strategy(name)
    plugin, profile, _ = BUILTINS[name]
    assert registered.name == name
    assert registered.spec.name == name
    assert registered.plugin == plugin
    assert registered.distribution == "mtrremu"
    assert registered.version == importlib.metadata.version("mtrremu")
    assert registered.spec.profile is profile
    assert set(registered.spec.options) == ({"scope"} if name == "lazy" else set())


def test_series_strategies_use_the_6_7_profile(manager: PluginManager) -> None:
    assert {manager.strategy(name).spec.profile for name in SERIES} == {Profile.KVM_6_7}


# -- choosing a strategy by name -------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_vm_uses_the_named_strategy(manager: PluginManager, name: str) -> None:
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), name)
    _, profile, class_name = BUILTINS[name]
    assert vm.strategy_name == name
    assert type(vm.strategy).__name__ == class_name
    assert vm.profile is profile


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_each_vm_gets_a_fresh_strategy_object(manager: PluginManager, name: str) -> None:
    first = manager.create_vm(VmConfig(), name)
    second = manager.create_vm(VmConfig(), name)
    assert first.strategy is not second.strategy


def test_vm_strategy_is_the_object_the_factory_built() -> None:
    factory = RecordingFactory()
    manager = PluginManager(entry_points=False, plugins=[SpecPlugin("p", [spec("rec", factory)])])
    first = manager.create_vm(VmConfig(), "rec")
    second = manager.create_vm(VmConfig(), "rec")
    assert len(factory.built) == 2
    assert first.strategy is factory.built[0]
    assert second.strategy is factory.built[1]


def test_default_strategy_is_fine_grained(manager: PluginManager) -> None:
    assert manager.create_vm().strategy_name == "fine-grained"


def test_vm_ids_are_distinct_unless_given(manager: PluginManager) -> None:
    first = manager.create_vm(VmConfig(), "zap-all")
    second = manager.create_vm(VmConfig(), "zap-all")
    assert first.vm_id != second.vm_id
    assert manager.create_vm(VmConfig(), "zap-all", vm_id="guest-a").vm_id == "guest-a"


def test_unknown_strategy_lists_every_valid_name(manager: PluginManager) -> None:
    with pytest.raises(UnknownStrategy) as info:
        manager.create_vm(VmConfig(), "zap-some")
    message = str(info.value)
    assert "'zap-some'" in message
    for name in ALL_STRATEGIES:
        assert name in message
    assert info.value.status == "NOT_FOUND"


def test_unknown_strategy_lookup(manager: PluginManager) -> None:
    with pytest.raises(UnknownStrategy, match="valid strategies: fine-grained, "):
        manager.strategy("ZAP-ALL")


# -- strategy options ------------------------------------------------------------------------


def test_builtin_strategy_refuses_options(manager: PluginManager) -> None:
    refused = r"does not take option\(s\) knob \(accepted: events\)"
    with pytest.raises(InvalidArgument, match=refused):
        manager.create_vm(VmConfig(), "zap-all", {"knob": "1"})


def test_every_strategy_takes_the_event_filter_and_its_factory_never_sees_it() -> None:
    factory = RecordingFactory()
    manager = PluginManager(
        entry_points=False, plugins=[SpecPlugin("opts", [spec("tunable", factory, knob="help")])]
    )
    manager.create_vm(VmConfig(), "tunable", {"knob": "1", "events": "changed,acrn"})
    assert factory.calls == [{"knob": "1"}]
    with pytest.raises(InvalidArgument, match="events='sometimes'"):
        manager.create_vm(VmConfig(), "tunable", {"events": "sometimes"})


def test_declared_option_reaches_the_factory() -> None:
    factory = RecordingFactory()
    plugin = SpecPlugin("opts", [spec("tunable", factory, knob="help")])
    manager = PluginManager(entry_points=False, plugins=[plugin])
    assert dict(manager.strategy("tunable").spec.options) == {"knob": "help"}
    vm = manager.create_vm(VmConfig(), "tunable", {"knob": "7"})
    assert factory.calls == [{"knob": "7"}]
    assert vm.strategy is factory.built[0]


def test_no_options_gives_the_factory_an_empty_mapping() -> None:
    factory = RecordingFactory()
    manager = PluginManager(
        entry_points=False, plugins=[SpecPlugin("opts", [spec("tunable", factory, knob="help")])]
    )
    manager.create_vm(VmConfig(), "tunable")
    assert factory.calls == [{}]


def test_undeclared_option_is_refused_before_the_factory_runs() -> None:
    factory = RecordingFactory()
    manager = PluginManager(
        entry_points=False, plugins=[SpecPlugin("opts", [spec("tunable", factory, knob="help")])]
    )
    with pytest.raises(InvalidArgument) as info:
        manager.create_vm(VmConfig(), "tunable", {"knob": "1", "dial": "2"})
    assert "dial" in str(info.value)
    assert "accepted: events, knob" in str(info.value)
    assert factory.calls == []


# -- registration errors ---------------------------------------------------------------------


def test_two_plugins_with_the_same_name_conflict() -> None:
    first = SpecPlugin("plugin_one", [spec("shared")])
    second = SpecPlugin("plugin_two", [spec("shared")])
    with pytest.raises(PluginConflict) as info:
        PluginManager(entry_points=False, plugins=[first, second], strict=True)
    message = str(info.value)
    assert "'shared'" in message
    assert "plugin_one" in message
    assert "plugin_two" in message


def test_third_party_duplicate_of_a_builtin_conflicts() -> None:
    with pytest.raises(PluginConflict) as info:
        PluginManager(
            entry_points=False, plugins=[SpecPlugin("impostor", [spec("zap-all")])], strict=True
        )
    message = str(info.value)
    assert "'zap-all'" in message
    assert SERIES_PLUGIN in message
    assert "impostor" in message


def test_one_plugin_repeating_a_name_conflicts() -> None:
    with pytest.raises(PluginConflict, match="'twice'"):
        PluginManager(
            entry_points=False,
            plugins=[SpecPlugin("p", [spec("twice"), spec("twice")])],
            strict=True,
        )


@pytest.mark.parametrize("name", ["Zap-All", "zap all", "", "-zap", "zap_all", "zap-all\n"])
def test_strategy_spec_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="must be lower-case letters, digits"):
        spec(name)


@pytest.mark.parametrize("name", ["zap-all", "kvm-6.11", "0day", "a"])
def test_strategy_spec_accepts_good_names(name: str) -> None:
    assert spec(name).name == name


def test_hook_returning_a_non_spec_names_the_plugin() -> None:
    bad = SpecPlugin("sloppy_plugin", [spec("fine"), "not-a-spec"])
    with pytest.raises(BrokenPlugin, match=r"plugin 'sloppy_plugin' .*returned 'not-a-spec'"):
        PluginManager(entry_points=False, plugins=[bad], strict=True)


def test_hook_returning_a_non_iterable_names_the_plugin() -> None:
    with pytest.raises(BrokenPlugin, match=r"plugin 'lazy_plugin'.* returned 42"):
        PluginManager(entry_points=False, plugins=[SpecPlugin("lazy_plugin", 42)], strict=True)


def test_misspelt_hook_fails_check_pending() -> None:
    with pytest.raises(BrokenPlugin, match=r"PluginValidationError: .*mtrremu_strategy"):
        PluginManager(entry_points=False, plugins=[Misspelt()], strict=True)


# -- third-party distributions ---------------------------------------------------------------


def test_thirdparty_distribution_is_discovered(thirdparty: Path) -> None:
    # Only this distribution: others installed in the environment do not count here.
    only = PluginSelection(only=frozenset({"thirdparty-mtrremu-plugin"}))
    manager = PluginManager(selection=only)
    registered = manager.strategy("experimental-noop")
    assert registered.distribution == "thirdparty-mtrremu-plugin"
    assert registered.version == "1.2.3"
    assert registered.plugin == "noop"
    assert registered.spec.profile is Profile.KVM_6_7
    assert [s.name for s in manager.strategies()] == sorted([*ALL_STRATEGIES, "experimental-noop"])
    # Built-ins keep their own provenance next to a third-party plugin.
    assert manager.strategy("zap-all").distribution == "mtrremu"


def test_thirdparty_strategy_runs_a_vm(thirdparty: Path) -> None:
    vm = PluginManager().create_vm(VmConfig(noncoherent_dma=1), "experimental-noop")
    assert vm.strategy_name == "experimental-noop"
    assert type(vm.strategy).__name__ == "Noop"
    assert type(vm.strategy).__module__ == THIRDPARTY_MODULE
    vm.access(0, 0x100000)
    before = leaves(vm)
    result = vm.write_cr0(0, 0x11)
    assert result.cd_toggled
    assert vm.counters.zaps_executed == 0
    assert leaves(vm) == before


def test_entry_points_are_ignored_when_disabled(thirdparty: Path) -> None:
    manager = PluginManager(entry_points=False)
    assert [s.name for s in manager.strategies()] == sorted(ALL_STRATEGIES)


# -- observer hooks --------------------------------------------------------------------------


def observed() -> tuple[Recorder, PluginManager]:
    recorder = Recorder()
    return recorder, PluginManager(entry_points=False, plugins=[recorder])


def test_without_observers_the_null_observer_is_used(manager: PluginManager) -> None:
    observer = manager.observer()
    assert observer is NULL_OBSERVER
    assert observer.active is False


def test_an_observer_plugin_activates_the_observer() -> None:
    _, manager = observed()
    assert manager.observer().active is True


def test_access_reports_one_fault_and_one_event() -> None:
    recorder, manager = observed()
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "zap-all", vm_id="vm-obs")
    result = vm.access(0, 0x100000)
    assert len(recorder.faults) == 1
    assert len(recorder.handled) == 1
    assert recorder.zaps == []
    vm_id, vcpu, faulted = recorder.faults[0]
    assert (vm_id, vcpu) == ("vm-obs", 0)
    assert faulted is result
    assert recorder.handled[0][0] == "vm-obs"
    assert recorder.handled[0][1] is result


def test_hit_reports_an_event_but_no_fault() -> None:
    recorder, manager = observed()
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "zap-all")
    vm.access(0, 0x100000)
    recorder.clear()
    result = vm.access(0, 0x101000)
    assert recorder.faults == []
    assert recorder.handled == [(vm.vm_id, result)]


def test_cd_clear_reports_one_zap_all() -> None:
    recorder, manager = observed()
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "zap-all", vm_id="vm-zap")
    for gfn in (0x100, 0x40000, 0x80000):
        vm.access(0, gpa(gfn))
    present = len(leaves(vm))
    assert present == 3
    recorder.clear()
    assert vm.vcpu(0).cr0 == 0x60000010
    result = vm.write_cr0(0, 0x10)
    assert result.cd_toggled
    assert len(recorder.zaps) == 1
    vm_id, rng, outcome = recorder.zaps[0]
    assert vm_id == "vm-zap"
    assert rng == ZAP_ALL
    assert outcome.leaves_removed == present
    assert leaves(vm) == []
    assert recorder.faults == []
    assert recorder.handled == [("vm-zap", result)]


def test_zap_drained_from_the_list_is_reported_once() -> None:
    recorder, manager = observed()
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "zap-all-serialized")
    vm.access(0, 0x100000)
    recorder.clear()
    vm.write_cr0(0, CD0)
    assert [(rng, outcome.leaves_removed) for _, rng, outcome in recorder.zaps] == [(ZAP_ALL, 1)]
    assert len(recorder.handled) == 1


def test_host_cr0_write_reports_no_zap() -> None:
    recorder, manager = observed()
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "zap-all")
    vm.access(0, 0x100000)
    recorder.clear()
    vm.write_cr0(0, 0x10, host=True)
    assert recorder.zaps == []
    assert len(recorder.handled) == 1


# -- dependency direction --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        # The core and its plugins never need grpc.
        ("import mtrremu; mtrremu.create_vm()", ("grpc",)),
        # Only ``serve``, runs against a server and charts pay for these imports.
        ("import mtrremu.cli", ("grpc", "matplotlib")),
    ],
    ids=["core", "cli"],
)
def test_imports_stay_light(statement: str, absent: tuple[str, ...]) -> None:
    code = (
        f"import sys; {statement}; "
        f"print(sorted(m for m in sys.modules if m.startswith({absent!r})))"
    )
    done = run_command(sys.executable, "-c", code, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- provenance and robustness ---------------------------------------------------------------


def test_plugins_passed_directly_are_credited_to_no_distribution() -> None:
    manager = PluginManager(entry_points=False, plugins=[SpecPlugin("local", [spec("local-x")])])
    registered = manager.strategy("local-x")
    assert (registered.plugin, registered.distribution, registered.version) == (
        "local",
        "(unpackaged)",
        "",
    )


def test_two_distributions_using_one_entry_point_name_conflict(
    thirdparty: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path_factory.mktemp("other")
    info = other / "other_mtrremu_plugin-0.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-plugin\nVersion: 0.9\n")
    (info / "entry_points.txt").write_text(f"[mtrremu]\nnoop = {THIRDPARTY_MODULE}\n")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(PluginConflict) as caught:
        PluginManager(strict=True)
    message = str(caught.value)
    assert "'noop'" in message
    assert "other-plugin" in message and "thirdparty-mtrremu-plugin" in message


class Raising:
    """An observer plugin with a bug: every hook raises."""

    @hookimpl
    def mtrremu_zap_executed(self, vm_id: str, rng: GfnRange, outcome: ZapOutcome) -> None:
        raise RuntimeError("observer bug")

    @hookimpl
    def mtrremu_fault(self, vm_id: str, vcpu: int, result: EventResult) -> None:
        raise RuntimeError("observer bug")


def test_a_raising_observer_leaves_the_vm_consistent(caplog: pytest.LogCaptureFixture) -> None:
    manager = PluginManager(entry_points=False, plugins=[Raising()])
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "zap-all-serialized")
    vm.access(0, 0x100000)
    assert vm.counters.faults == 1 and len(leaves(vm)) == 1
    result = vm.write_cr0(0, CD0)
    assert result.counters.zaps_executed == 1 and leaves(vm) == []
    assert vm.zap_list.try_claim()  # the flag was released despite the observer
    assert "observer hook mtrremu_fault raised" in caplog.text
