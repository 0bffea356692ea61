"""Realistic guest workloads, each a parameterised generator
of a :class:`~mtrremu.workloads.trace.Trace`.

========  ===================================================================
``W1``    SeaBIOS → Linux on q35 (:mod:`.w1_seabios`)
``W2``    OVMF → Linux on q35 (:mod:`.w2_ovmf`)
``W3``    direct kernel boot: Firecracker, Cloud Hypervisor, crosvm (:mod:`.w3_direct`)
``W4``    a large VM: pre-populated RAM, a whole-VM MTRR event (:mod:`.w4_large`)
``W5``    runtime ``mtrr_add``/``mtrr_del`` over a device BAR (:mod:`.w5_runtime`)
``W6``    hvmloader-style serial programming (:mod:`.w6_hvmloader`)
``W7``    the passthrough device unplugged and plugged back (:mod:`.w7_hotplug`)
========  ===================================================================

The same workload, parameters and seed always give the same trace.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mtrremu.core.errors import InvalidArgument
from mtrremu.core.units import SIZE_SUFFIXES
from mtrremu.workloads import (
    w1_seabios,
    w2_ovmf,
    w3_direct,
    w4_large,
    w5_runtime,
    w6_hvmloader,
    w7_hotplug,
)
from mtrremu.workloads.trace import Trace


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    params: type[Any]
    build: Callable[[Any, int], Trace]


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", "SeaBIOS -> Linux (q35)", w1_seabios.Params, w1_seabios.build),
    "W2": Workload("W2", "OVMF -> Linux (q35)", w2_ovmf.Params, w2_ovmf.build),
    "W3": Workload("W3", "direct kernel boot", w3_direct.Params, w3_direct.build),
    "W4": Workload("W4", "large VM, whole-VM MTRR event", w4_large.Params, w4_large.build),
    "W5": Workload("W5", "runtime mtrr_add/mtrr_del", w5_runtime.Params, w5_runtime.build),
    "W6": Workload("W6", "hvmloader serial programming", w6_hvmloader.Params, w6_hvmloader.build),
    "W7": Workload("W7", "device unplugged and replugged", w7_hotplug.Params, w7_hotplug.build),
}


def workload(name: str) -> Workload:
    try:
        return WORKLOADS[name.upper()]
    except KeyError:
        raise InvalidArgument(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


def parse_value(text: str, kind: Any) -> Any:
    """A parameter value from the command line: sizes take K/M/G/T suffixes."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidArgument(f"{text!r} is not a boolean")
    if kind is int:
        scale = SIZE_SUFFIXES.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale > 1 else text
        try:
            return int(digits, 0) * scale
        except ValueError:
            raise InvalidArgument(f"{text!r} is not an integer or a size like 16G") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise InvalidArgument(f"{text!r} is not a number") from None
    return text


def make_params(spec: Workload, overrides: Mapping[str, Any]) -> Any:
    """The workload's parameters with ``overrides`` (``name``, or ``group.name`` for a group of
    parameters such as ``linux.touch_fraction``; strings are parsed by the field's type).
    Unknown names are refused, listing the known ones."""
    params = spec.params()
    hints = typing.get_type_hints(spec.params)
    groups = {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}
    group_hints = {name: typing.get_type_hints(hint) for name, hint in groups.items()}
    top: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        group, dot, name = key.partition(".")
        if dot and name in group_hints.get(group, {}):
            kind = group_hints[group][name]
            inner.setdefault(group, {})[name] = _parsed(raw, kind)
        elif not dot and key in hints and key not in groups:
            top[key] = _parsed(raw, hints[key])
        else:
            known = [k for k in hints if k not in groups]
            known += [f"{g}.{n}" for g, names in group_hints.items() for n in names]
            raise InvalidArgument(
                f"{spec.id} has no parameter {key!r}; known: {', '.join(sorted(known))}"
            )
    for group, values in inner.items():
        top[group] = dataclasses.replace(getattr(params, group), **values)
    return dataclasses.replace(params, **top)


def _parsed(raw: Any, kind: Any) -> Any:
    return parse_value(raw, kind) if isinstance(raw, str) else raw


def build(name: str, overrides: Mapping[str, Any] | None = None, seed: int = 1) -> Trace:
    """Generate a workload's trace."""
    spec = workload(name)
    params = make_params(spec, overrides or {})
    try:
        return spec.build(params, seed)
    except ValueError as error:
        raise InvalidArgument(f"{spec.id}: {error}") from None


__all__ = ["WORKLOADS", "Trace", "Workload", "build", "make_params", "workload"]
