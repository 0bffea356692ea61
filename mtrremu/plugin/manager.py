"""Finds plugins, collects their strategies and builds VMs with the strategy they ask for.

Registration order is fixed: the built-in strategies first (registered through the same hook a
third party implements), then every plugin installed under the ``mtrremu`` entry-point group,
then ``check_pending`` so a misspelt hook fails loudly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import pluggy

from mtrremu.core import event_filter as event_filter_option
from mtrremu.core.config import VmConfig
from mtrremu.core.ept import ZapOutcome
from mtrremu.core.errors import BrokenStrategy, InvalidArgument, PluginConflict, UnknownStrategy
from mtrremu.core.event_filter import EventFilter
from mtrremu.core.events import EventResult
from mtrremu.core.observer import NULL_OBSERVER, Observer
from mtrremu.core.strategy import ZapStrategy, protocol_gaps
from mtrremu.core.units import GfnRange
from mtrremu.core.vm import Vm
from mtrremu.plugin import hookspecs
from mtrremu.plugin.records import StrategySpec

ENTRY_POINT_GROUP = "mtrremu"
BUILTIN_PLUGINS = (
    "mtrremu_strategies.kvm_releases",
    "mtrremu_strategies.series",
    "mtrremu_strategies.experimental",
)
_OBSERVER_HOOKS = ("mtrremu_zap_executed", "mtrremu_fault", "mtrremu_event_handled")
_log = logging.getLogger(__name__)


def own_version() -> str:
    try:
        return importlib.metadata.version("mtrremu")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class RegisteredStrategy:
    """A strategy and where it came from."""

    spec: StrategySpec
    plugin: str
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


class _PluggyObserver:
    """Forwards the core's observer calls to the observer hooks that have implementations.

    An observer that raises is a plugin bug: it is logged and the emulator carries on, so a
    tracing plugin can never leave a VM half-updated (or a zap list claimed forever).
    """

    active = True

    def __init__(self, hook: pluggy.HookRelay) -> None:
        self._hook = hook
        self._has = {name: bool(getattr(hook, name).get_hookimpls()) for name in _OBSERVER_HOOKS}

    def _call(self, name: str, **kwargs: object) -> None:
        if not self._has[name]:
            return
        try:
            getattr(self._hook, name)(**kwargs)
        except Exception:
            _log.exception("observer hook %s raised; the event itself completed", name)

    def zap_executed(self, vm_id: str, rng: GfnRange, outcome: ZapOutcome) -> None:
        self._call("mtrremu_zap_executed", vm_id=vm_id, rng=rng, outcome=outcome)

    def fault(self, vm_id: str, vcpu: int, result: EventResult) -> None:
        self._call("mtrremu_fault", vm_id=vm_id, vcpu=vcpu, result=result)

    def event_handled(self, vm_id: str, result: EventResult) -> None:
        self._call("mtrremu_event_handled", vm_id=vm_id, result=result)


class PluginManager:
    """The registry of strategies and observers for one process (or one test).

    ``modules`` (import paths, e.g. ``mtrremu.testing.mutants``) and then ``plugins`` (objects)
    are registered after the built-ins and before entry points. A module is credited to the
    distribution that installed it, if any; a plugin object to none (``(unpackaged)``).
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        plugins: Sequence[object | ModuleType] = (),
        modules: Sequence[str] = (),
    ) -> None:
        self._pm = pluggy.PluginManager("mtrremu")
        self._pm.add_hookspecs(hookspecs)
        self._origin: dict[str, tuple[str, str]] = {}
        for module in BUILTIN_PLUGINS:
            self._pm.register(importlib.import_module(module), name=module)
            self._origin[module] = ("mtrremu", own_version())
        for module in modules:
            self._pm.register(_import_plugin(module), name=module)
            self._origin[module] = _distribution_of(module)
        for plugin in plugins:
            name = self._pm.register(plugin)
            if name is not None:
                self._origin[name] = ("(unpackaged)", "")
        if entry_points:
            self._load_entry_points()
        self._pm.check_pending()
        self._strategies = self._collect()
        self._ids = itertools.count(1)

    def _load_entry_points(self) -> None:
        """Register every plugin of the entry-point group; a name clash is an error (pluggy's
        own loader would silently skip the second one)."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = (ep.dist.name, ep.dist.version) if ep.dist else ("(unknown)", "")
            if ep.name in self._origin:
                other = self._origin[ep.name]
                raise PluginConflict(
                    f"plugin name {ep.name!r} of {dist[0]} {dist[1]} is already taken by "
                    f"{other[0]} {other[1]}"
                )
            self._pm.register(ep.load(), name=ep.name)
            self._origin[ep.name] = dist

    def _collect(self) -> dict[str, RegisteredStrategy]:
        found: dict[str, RegisteredStrategy] = {}
        for impl in self._pm.hook.mtrremu_strategies.get_hookimpls():
            distribution, version = self._origin.get(impl.plugin_name, ("(unpackaged)", ""))
            specs = impl.function()
            if not isinstance(specs, Iterable):
                raise TypeError(
                    f"plugin {impl.plugin_name}: mtrremu_strategies must return records"
                )
            for spec in specs:
                if not isinstance(spec, StrategySpec):
                    raise TypeError(
                        f"plugin {impl.plugin_name} returned {spec!r}, not a StrategySpec"
                    )
                entry = RegisteredStrategy(spec, impl.plugin_name, distribution, version)
                if spec.name in found:
                    other = found[spec.name]
                    raise PluginConflict(
                        f"strategy {spec.name!r} is provided by both {other.plugin} "
                        f"({other.distribution} {other.version}) and {entry.plugin} "
                        f"({distribution} {version})"
                    )
                found[spec.name] = entry
        return found

    @property
    def hook(self) -> pluggy.HookRelay:
        return self._pm.hook

    def strategies(self) -> list[RegisteredStrategy]:
        """Every registered strategy, sorted by name."""
        return sorted(self._strategies.values(), key=lambda s: s.name)

    def strategy(self, name: str) -> RegisteredStrategy:
        try:
            return self._strategies[name]
        except KeyError:
            valid = ", ".join(sorted(self._strategies))
            raise UnknownStrategy(f"unknown strategy {name!r}; valid strategies: {valid}") from None

    def observer(self) -> Observer:
        """An observer forwarding to the observer hooks, or the null one if none is implemented."""
        if any(getattr(self._pm.hook, name).get_hookimpls() for name in _OBSERVER_HOOKS):
            return _PluggyObserver(self._pm.hook)
        return NULL_OBSERVER

    def check_options(self, strategy: str, options: Mapping[str, object]) -> EventFilter:
        """Refuse an unknown strategy, an option it does not take or a bad event filter (the
        strategy's own option values are its factory's to judge); returns the event filter."""
        registered = self.strategy(strategy)
        bad = sorted(k for k, v in options.items() if not isinstance(v, str))
        if bad:
            raise InvalidArgument(f"strategy option values must be strings: {', '.join(bad)}")
        accepted = accepted_options(registered)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise InvalidArgument(
                f"strategy {strategy!r} does not take option(s) {', '.join(unknown)} "
                f"(accepted: {', '.join(sorted(accepted))})"
            )
        return EventFilter.parse(str(options.get(event_filter_option.OPTION, "all")))

    def create_vm(
        self,
        config: VmConfig | None = None,
        strategy: str = "fine-grained",
        options: Mapping[str, str] | None = None,
        *,
        vm_id: str | None = None,
    ) -> Vm:
        """A VM using the named strategy, built once and called directly by the VM."""
        registered = self.strategy(strategy)
        options = dict(options or {})
        event_filter = self.check_options(strategy, options)
        options.pop(event_filter_option.OPTION, None)
        return Vm(
            config or VmConfig(),
            build_strategy(registered, options),
            registered.spec.profile,
            vm_id=f"vm-{next(self._ids)}" if vm_id is None else vm_id,
            strategy_name=strategy,
            observer=self.observer(),
            known_gaps=registered.spec.known_gaps,
            event_filter=event_filter,
            mmu_lock=registered.spec.mmu_lock,
        )


#: Options every strategy takes, handled by the VM (never passed to a factory).
COMMON_OPTIONS = {event_filter_option.OPTION: event_filter_option.OPTION_HELP}


def accepted_options(registered: RegisteredStrategy) -> dict[str, str]:
    """Every option a VM using ``registered`` may ask for (name → help): its own and the
    options every strategy takes."""
    return {**registered.spec.options, **COMMON_OPTIONS}


def build_strategy(registered: RegisteredStrategy, options: Mapping[str, str]) -> ZapStrategy:
    """One VM's strategy object from ``registered``'s factory, checked against the protocol.

    A factory raising :class:`InvalidArgument` refuses an option's value (the caller's
    error). A factory that raises anything else, or builds an object lacking a
    :class:`ZapStrategy` method, is the plugin's bug: :class:`BrokenStrategy` names the
    strategy, its distribution and the cause.
    """
    origin = f"{registered.distribution} {registered.version}".strip()
    origin += f", plugin {registered.plugin}"
    try:
        strategy = registered.spec.factory(options)
    except InvalidArgument:
        raise  # the factory refused an option's value: the caller's error, not the plugin's
    except Exception as error:
        why = f"its factory raised {type(error).__name__}: {error}"
        raise BrokenStrategy(registered.name, origin, why) from error
    missing = protocol_gaps(strategy)
    if missing:
        raise BrokenStrategy(
            registered.name,
            origin,
            f"its factory built {type(strategy).__name__}, which lacks {', '.join(missing)} "
            "(a zap strategy implements on_mtrr_write, on_cd_toggle and on_dma_transition)",
        )
    return strategy


@lru_cache(maxsize=1)
def default_manager() -> PluginManager:
    """The process-wide manager: built-ins plus installed entry-point plugins."""
    return PluginManager()


@lru_cache(maxsize=8)
def manager_for(modules: tuple[str, ...] = ()) -> PluginManager:
    """The process-wide manager, with the plugin ``modules`` (import paths) registered too:
    how a command line loads a plugin that is not installed (``--plugin``)."""
    return PluginManager(modules=modules) if modules else default_manager()


def _import_plugin(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InvalidArgument(f"cannot import plugin module {module!r}: {error}") from None


def _distribution_of(module: str) -> tuple[str, str]:
    """(distribution, version) that installed ``module``'s top-level package, if one did."""
    for name in importlib.metadata.packages_distributions().get(module.partition(".")[0], []):
        return name, importlib.metadata.version(name)
    return "(unpackaged)", ""
