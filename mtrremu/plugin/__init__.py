"""The plugin API: the only door from a plugin into the core.

A plugin is a module or object with ``@hookimpl`` functions named after the hooks in
:mod:`mtrremu.plugin.hookspecs`, installed under the ``mtrremu`` entry-point group::

    [project.entry-points.mtrremu]
    my_strategies = "my_package.strategies"

A strategy implements :class:`ZapStrategy` (three methods, each returning a
:class:`ZapDecision`, and optionally ``on_host_cd_change``) and is registered as a
:class:`StrategySpec`. Everything a strategy may read or return is re-exported here, with the
helpers that give an event's exact effect on memory types (:func:`memtype_map`,
:func:`changed_ranges`, :func:`merge_ranges`). A plugin module may declare the hook
catalogue version it was built for, ``MTRREMU_HOOKSPEC_VERSION = N`` (missing means 1); one
newer than :data:`HOOKSPEC_VERSION` is refused. How plugins are found, selected, traced and
refused: docs/plugin-loading.md.
"""

import pluggy

from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.errors import InvalidArgument
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import EptMemtype, Profile
from mtrremu.core.memtypes import MemType
from mtrremu.core.msrs import msr_name
from mtrremu.core.oracle import Gap
from mtrremu.core.strategy import (
    NO_ZAP,
    AllocFailure,
    MmuLock,
    MtrrView,
    Route,
    VcpuView,
    VmView,
    ZapDecision,
    ZapStrategy,
    changed_ranges,
    kvm_mtrr_write_range,
    memtype_map,
    merge_ranges,
)
from mtrremu.core.units import ZAP_ALL, GfnRange
from mtrremu.plugin.hookspecs import HOOKSPEC_VERSION
from mtrremu.plugin.records import StrategyFactory, StrategySpec

#: Marks a plugin's hook implementations.
hookimpl = pluggy.HookimplMarker("mtrremu")

__all__ = [
    "HOOKSPEC_VERSION",
    "NO_ZAP",
    "ZAP_ALL",
    "AllocFailure",
    "EptMemtype",
    "Gap",
    "GfnRange",
    "InvalidArgument",
    "IntervalMap",
    "MemType",
    "Memslot",
    "MemslotKind",
    "MmuLock",
    "MtrrView",
    "Profile",
    "Route",
    "StrategyFactory",
    "StrategySpec",
    "VcpuView",
    "VmConfig",
    "VmView",
    "ZapDecision",
    "ZapStrategy",
    "hookimpl",
    "changed_ranges",
    "kvm_mtrr_write_range",
    "memtype_map",
    "merge_ranges",
    "msr_name",
]
