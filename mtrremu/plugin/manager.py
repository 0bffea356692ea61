"""Finds plugins, collects their strategies and builds VMs with the strategy they ask for.

Registration order is fixed: the built-in strategies first (registered through the same hook a
third party implements), then the plugin modules and objects a caller names, then every plugin
installed under the ``mtrremu`` entry-point group that the :class:`PluginSelection` admits. A
plugin that cannot be loaded (import error, hookspec version too new, pluggy validation,
``mtrremu_strategies`` raising or returning garbage, a name already taken) becomes a
:class:`PluginFault`, is unregistered and logged; the others load (docs/plugin-loading.md).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import pluggy

from mtrremu.core import event_filter as event_filter_option
from mtrremu.core.config import VmConfig
from mtrremu.core.ept import ZapOutcome
from mtrremu.core.errors import (
    BrokenPlugin,
    BrokenStrategy,
    IncompatiblePlugin,
    InvalidArgument,
    MtrremuError,
    PluginConflict,
    UnknownStrategy,
)
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
#: The distribution the built-ins belong to: always loaded, never blocked.
OWN_DISTRIBUTION = "mtrremu"
#: Comma-separated plugin distributions never loaded (``--block-plugin``).
BLOCK_ENV = "MTRREMU_PLUGINS_BLOCK"
#: Comma-separated plugin distributions that are the only ones loaded (``--only-plugins``).
ONLY_ENV = "MTRREMU_PLUGINS_ONLY"
#: ``1`` (or ``true``, ``yes``, ``on``): log every hook call (``--trace-hooks``).
TRACE_ENV = "MTRREMU_TRACE_HOOKS"
_OBSERVER_HOOKS = ("mtrremu_zap_executed", "mtrremu_fault", "mtrremu_event_handled")
_STRATEGIES_HOOK = "mtrremu_strategies"
_log = logging.getLogger(__name__)
#: Where ``--trace-hooks`` writes: one line per hook call and one per its outcome.
_trace = logging.getLogger("mtrremu.hooks")


def own_version() -> str:
    try:
        return importlib.metadata.version("mtrremu")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def canonical_distribution(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503: case and runs of
    ``-``, ``_`` and ``.`` do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(text: str) -> frozenset[str]:
    return frozenset(canonical_distribution(n) for n in text.split(",") if n.strip())


@dataclass(frozen=True)
class PluginSelection:
    """Which installed plugin distributions load (canonical names), and whether hook calls are
    traced. ``only`` is ``None`` for "every distribution"; the built-ins' distribution
    (:data:`OWN_DISTRIBUTION`) is always admitted and may not be blocked. The selection applies
    to entry-point plugins only: a module or object the caller names explicitly always loads."""

    block: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    trace_hooks: bool = False

    def __post_init__(self) -> None:
        if OWN_DISTRIBUTION in self.block:
            raise InvalidArgument(
                f"the built-in distribution {OWN_DISTRIBUTION!r} cannot be blocked "
                "(choose the strategies a run compares with -s)"
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> PluginSelection:
        """The selection :data:`BLOCK_ENV`, :data:`ONLY_ENV` and :data:`TRACE_ENV` describe (in
        ``environ``, by default the process's environment); an empty ``ONLY`` list means "no
        third-party distribution"."""
        environ = os.environ if environ is None else environ
        only = environ.get(ONLY_ENV)
        return cls(
            block=_names(environ.get(BLOCK_ENV, "")),
            only=None if only is None else _names(only),
            trace_hooks=environ.get(TRACE_ENV, "").strip().lower() in ("1", "true", "yes", "on"),
        )

    def refusal(self, distribution: str) -> str | None:
        """Why ``distribution``'s plugins are not loaded, or ``None`` if they are."""
        name = canonical_distribution(distribution)
        if name == OWN_DISTRIBUTION:
            return None
        if name in self.block:
            return f"blocked ({BLOCK_ENV} / --block-plugin)"
        if self.only is not None and name not in self.only:
            return f"not in the only-list ({ONLY_ENV} / --only-plugins)"
        return None


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


@dataclass(frozen=True)
class PluginFault:
    """A plugin that was not loaded, and why: ``error`` (:class:`BrokenPlugin`,
    :class:`IncompatiblePlugin` or :class:`PluginConflict`) names the plugin and its
    distribution."""

    plugin: str
    distribution: str
    version: str
    error: MtrremuError


@dataclass(frozen=True)
class SkippedPlugin:
    """An installed entry-point plugin the :class:`PluginSelection` left out."""

    plugin: str
    distribution: str
    version: str
    why: str


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
    distribution that installed it, if any; a plugin object to none (``(unpackaged)``). A
    module in ``modules`` that cannot be imported is the caller's error
    (:class:`InvalidArgument`); every other plugin problem is a :class:`PluginFault` in
    :attr:`faults`, logged as a warning, and the plugin is left out — or, with ``strict``, the
    first fault's error is raised once every plugin was tried.

    Every hook is called through pluggy (``pm.hook``), so wrappers and ``tryfirst``/``trylast``
    apply; only the strategy objects a VM uses are called directly (the VM resolves its
    strategy once: a hook call per MTRR write would cost more than most strategies' work).
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        plugins: Sequence[object | ModuleType] = (),
        modules: Sequence[str] = (),
        selection: PluginSelection = PluginSelection(),
        strict: bool = False,
    ) -> None:
        self._pm = pluggy.PluginManager("mtrremu")
        self._pm.add_hookspecs(hookspecs)
        if selection.trace_hooks:
            _enable_tracing(self._pm)
        self._origin: dict[str, tuple[str, str]] = {}
        self._faults: list[PluginFault] = []
        self.skipped: list[SkippedPlugin] = []
        for module in BUILTIN_PLUGINS:
            self._add(module, importlib.import_module(module), (OWN_DISTRIBUTION, own_version()))
        for module in modules:
            self._add(module, _import_plugin(module), _distribution_of(module))
        for plugin in plugins:
            name = self._pm.get_canonical_name(plugin)
            self._add(name, plugin, ("(unpackaged)", ""))
        if entry_points:
            self._load_entry_points(selection)
        self._strategies = self._collect()
        self._ids = itertools.count(1)
        for fault in self._faults:
            _log.warning("plugin not loaded: %s", fault.error)
        if strict and self._faults:
            raise self._faults[0].error

    @property
    def faults(self) -> list[PluginFault]:
        """The plugins that were not loaded, in the order they were tried."""
        return list(self._faults)

    def _fault(
        self, name: str, origin: tuple[str, str], error: MtrremuError, plugin: object = None
    ) -> None:
        """Record that plugin ``name`` is not loaded; unregister ``plugin`` if it was."""
        if plugin is not None and self._pm.is_registered(plugin):
            self._pm.unregister(plugin)
        self._faults.append(PluginFault(name, *origin, error))

    def _add(self, name: str, plugin: object, origin: tuple[str, str]) -> None:
        """Register ``plugin`` as ``name`` if its hookspec version, its name and its hook
        implementations are acceptable; otherwise record the fault."""
        where = _where(origin)
        if name in self._origin or self._pm.get_plugin(name) is not None:
            other = _where(self._origin.get(name, ("(unpackaged)", "")))
            why = f"plugin name {name!r} of {where} is already taken by {other}"
            self._fault(name, origin, PluginConflict(why))
            return
        wanted = getattr(plugin, "MTRREMU_HOOKSPEC_VERSION", 1)
        if type(wanted) is not int or wanted < 1:
            why = f"MTRREMU_HOOKSPEC_VERSION must be a positive int, not {wanted!r}"
            self._fault(name, origin, BrokenPlugin(name, where, why))
            return
        if wanted > hookspecs.HOOKSPEC_VERSION:
            why = (
                f"built for hookspec version {wanted}; this mtrremu supports up to "
                f"{hookspecs.HOOKSPEC_VERSION}: upgrade mtrremu"
            )
            self._fault(name, origin, IncompatiblePlugin(name, where, why))
            return
        try:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()  # a hook this catalogue does not have, e.g. a misspelling
        except (pluggy.PluginValidationError, ValueError) as error:
            why = _described(error)
            self._fault(name, origin, BrokenPlugin(name, where, why), plugin)
            return
        self._origin[name] = origin

    def _load_entry_points(self, selection: PluginSelection) -> None:
        """Register every plugin of the entry-point group that ``selection`` admits (pluggy's
        own loader would silently skip a second plugin of the same name: here it is a fault)."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            origin = (ep.dist.name, ep.dist.version) if ep.dist else ("(unknown)", "")
            why = selection.refusal(origin[0])
            if why is not None:
                self.skipped.append(SkippedPlugin(ep.name, *origin, why))
                continue
            try:
                plugin = ep.load()
            except Exception as error:  # any import-time failure is the plugin's fault
                why = f"cannot import {ep.value}: {_described(error)}"
                self._fault(ep.name, origin, BrokenPlugin(ep.name, _where(origin), why))
                continue
            self._add(ep.name, plugin, origin)

    def _collect(self) -> dict[str, RegisteredStrategy]:
        """Every plugin's strategies, from one ``mtrremu_strategies`` call per plugin through
        pluggy (the hook's wrappers around it): built-ins first, then pluggy's call order. A
        plugin whose call raises, returns garbage or reuses a taken name is faulted."""
        impls = [
            impl
            for impl in reversed(getattr(self._pm.hook, _STRATEGIES_HOOK).get_hookimpls())
            if not (impl.wrapper or impl.hookwrapper)
        ]
        impls.sort(key=lambda impl: impl.plugin_name not in BUILTIN_PLUGINS)  # stable
        found: dict[str, RegisteredStrategy] = {}
        for impl in impls:
            name = impl.plugin_name
            origin = self._origin[name]
            where = _where(origin)
            others = [i.plugin for i in impls if i is not impl]
            try:
                results = self._pm.subset_hook_caller(_STRATEGIES_HOOK, others)()
                specs = [_checked(spec) for result in results for spec in _records(result)]
            except Exception as error:
                why = f"mtrremu_strategies: {_described(error)}"
                self._fault(name, origin, BrokenPlugin(name, where, why), impl.plugin)
                continue
            conflict = _conflict(specs, found, name, where)
            if conflict is not None:
                self._fault(name, origin, conflict, impl.plugin)
                continue
            for spec in specs:
                found[spec.name] = RegisteredStrategy(spec, name, *origin)
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
    origin = _where((registered.distribution, registered.version))
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


def default_manager() -> PluginManager:
    """The process-wide manager: built-ins plus the installed entry-point plugins the
    environment's :class:`PluginSelection` admits."""
    return manager_for()


def manager_for(modules: tuple[str, ...] = ()) -> PluginManager:
    """The process-wide manager, with the plugin ``modules`` (import paths) registered too:
    how a command line loads a plugin that is not installed (``--plugin``). The installed
    plugins are selected by the environment (:meth:`PluginSelection.from_environment`), read
    at each call: one manager per (modules, selection)."""
    return _manager(modules, PluginSelection.from_environment())


@lru_cache(maxsize=8)
def _manager(modules: tuple[str, ...], selection: PluginSelection) -> PluginManager:
    return PluginManager(modules=modules, selection=selection)


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    """Log every hook call of ``pm`` (name, arguments, the implementing plugins) and its
    outcome to the ``mtrremu.hooks`` logger at INFO, on stderr unless logging is set up."""
    _trace.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not _trace.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mtrremu.hooks: %(message)s"))
        _trace.addHandler(handler)

    def before(hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]) -> None:
        arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        plugins = ", ".join(impl.plugin_name for impl in reversed(impls))
        _trace.info("call %s(%s) -> [%s]", hook, arguments, plugins)

    def after(
        outcome: pluggy.Result[object],
        hook: str,
        impls: Sequence[pluggy.HookImpl],
        kwargs: Mapping[str, object],
    ) -> None:
        if outcome.exception is not None:
            _trace.info("  %s raised %r", hook, outcome.exception)
        else:
            _trace.info("  %s returned %r", hook, outcome.get_result())

    pm.add_hookcall_monitoring(before, after)


def _where(origin: tuple[str, str]) -> str:
    """A plugin's ``(distribution, version)`` as text: ``"name 1.0"``."""
    return " ".join(origin).strip()


def _described(error: BaseException) -> str:
    """``error``'s type and message on one line (a fault is one line of a log)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _records(result: object) -> Iterable[object]:
    """What one ``mtrremu_strategies`` implementation returned, as an iterable."""
    if isinstance(result, str | bytes) or not isinstance(result, Iterable):
        raise TypeError(f"returned {result!r}, not an iterable of StrategySpec records")
    return result


def _checked(spec: object) -> StrategySpec:
    if not isinstance(spec, StrategySpec):
        raise TypeError(f"returned {spec!r}, not a StrategySpec")
    return spec


def _conflict(
    specs: Sequence[StrategySpec], found: Mapping[str, RegisteredStrategy], plugin: str, where: str
) -> PluginConflict | None:
    """The conflict if plugin ``plugin`` (of ``where``) reuses a strategy name already in
    ``found`` or repeats one of its own."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            return PluginConflict(
                f"plugin {plugin} ({where}) provides strategy {spec.name!r} twice"
            )
        other = found.get(spec.name)
        if other is not None:
            return PluginConflict(
                f"strategy {spec.name!r} is provided by both {other.plugin} "
                f"({other.distribution} {other.version}) and {plugin} ({where}); "
                f"{plugin} is not loaded"
            )
        seen.add(spec.name)
    return None


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
