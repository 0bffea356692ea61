"""Traces: what a workload replays, and their JSON Lines file format.

A trace is a VM configuration plus an ordered list of items: per-vCPU operations, VM-wide DMA
events, and bursts (groups of per-vCPU operation lists that act at the same time).

File format (version 2), one JSON object per line:

* line 1, the header::

    {"format": "mtrremu-trace", "version": 2, "workload": "W1", "params": {...},
     "vm": {"vcpus": 8, "noncoherent_dma": 1, "guest_maxphyaddr": 40,
            "quirk_cd_nw_cleared": true, "feature_mtrr": true, "tdp": true,
            "max_mapping_level": "1G", "precedence": "kvm",
            "memslots": [{"base_gpa": "0x0", "size_bytes": "0xa0000", "kind": "ram",
                          "name": "low"}]}}

  Only ``vcpus`` and ``memslots`` are required in ``vm``; the rest take VmConfig's defaults.

* every other line, one item: an operation, named and shaped as in the operation table
  (:mod:`mtrremu.core.operations`; the same names as the API's ``Operation`` fields)::

    {"op": "write_msr", "vcpu": 0, "msr": "0x2ff", "value": "0xc06", "host": false}
    {"op": "write_msrs", "vcpu": 0, "msrs": [{"msr": "0x2ff", "value": "0x0"}]}
    {"op": "read_msr", "vcpu": 0, "msr": "0x277", "host": false}
    {"op": "write_cr0", "vcpu": 0, "value": "0x11", "host": false}
    {"op": "reset_vcpu", "vcpu": 1}
    {"op": "init_vcpu", "vcpu": 1}
    {"op": "access_gpa", "vcpu": 0, "gpa": "0x100000"}
    {"op": "fault_range", "vcpu": 0, "start_gpa": "0x0", "end_gpa": "0x40000000"}
    {"op": "read_vcpu_state", "vcpu": 0}
    {"op": "attach_dma"}
    {"op": "detach_dma"}
    {"op": "lookup_gpa", "gpa": "0xfd000000"}
    {"op": "read_counters"}
    {"op": "check_staleness", "vcpu": 0, "at_quiescence": false}

  or a burst of per-vCPU operations::

    {"burst": {"seed": 7, "lanes": [{"vcpu": 1, "operations": [{"op": "write_cr0", ...}]}]}}

Numbers are JSON integers or ``"0x…"`` strings (written: ``vcpu`` in decimal, the rest in
hex); addresses are byte addresses (``gpa``, ``start_gpa``, ``end_gpa``), those of
``fault_range`` 4 KiB aligned; ``host`` and ``at_quiescence`` default to false. Blank lines are
ignored. :func:`load` rejects a malformed file with the line number and the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.errors import InvalidArgument, MtrremuError
from mtrremu.core.events import Burst, FaultRange, Item, MsrValue, Op, VcpuOp
from mtrremu.core.memtype import Precedence
from mtrremu.core.operations import BY_NAME, BY_TYPE
from mtrremu.core.units import PAGE_SHIFT, PAGE_SIZE, Level
from mtrremu.workloads.columns import LAYOUTS, Layout, TraceItems

FORMAT = "mtrremu-trace"
VERSION = 2


@dataclass(frozen=True)
class Trace:
    """A replayable workload: the VM it needs and what happens on it, in order."""

    workload: str
    config: VmConfig
    #: A tuple when built in memory; columns (:class:`TraceItems`) when read from a file.
    items: Sequence[Item]
    params: Mapping[str, Any] = field(default_factory=dict)
    #: For a host recording (:mod:`mtrremu.workloads.recording`): ``(vcpu, n)`` of each guest
    #: MSR write the host faulted (the ``n``-th guest MSR write of that vCPU, from 0), which
    #: the replay must fault too; ``None`` for anything else (nothing is compared).
    host_faults: frozenset[tuple[int, int]] | None = None

    @property
    def operations(self) -> int:
        """Operations in all, bursts counted by their lane operations."""
        if isinstance(self.items, TraceItems):
            return self.items.operations
        return sum(
            sum(len(ops) for _, ops in item.lanes) if isinstance(item, Burst) else 1
            for item in self.items
        )


class TraceFormatError(InvalidArgument):
    """A malformed trace file; the message starts with ``<file>:<line>:``."""

    reason = "INVALID_TRACE"

    def __init__(self, source: str, line: int, why: str) -> None:
        super().__init__(f"{source}:{line}: {why}")
        self.source = source
        self.line = line
        self.why = why

    def __reduce__(self) -> tuple[type[TraceFormatError], tuple[str, int, str]]:
        # Runs on other processes (local:N, Dask) send the error back pickled.
        return (TraceFormatError, (self.source, self.line, self.why))

    def metadata(self) -> dict[str, str]:
        return {"source": self.source, "line": str(self.line), "why": self.why}

    @classmethod
    def _rebuild(cls, message: str, metadata: Mapping[str, str]) -> MtrremuError:
        return cls(metadata["source"], int(metadata["line"]), metadata["why"])


# -- writing ------------------------------------------------------------------------------


#: Fields written in decimal; every other number is a "0x…" string.
_DECIMAL = frozenset({"vcpu"})


def _op_json(op: Op) -> dict[str, Any]:
    """``{"op": <name>, <field>: …}`` from the operation's row in the table."""
    kind = BY_TYPE[type(op)]
    record: dict[str, Any] = {"op": kind.name}
    for spec in kind.fields:
        value = getattr(op, spec.name)
        if spec.name == "msrs":
            record["msrs"] = [{"msr": hex(e.msr), "value": hex(e.value)} for e in value]
        elif isinstance(value, bool) or spec.name in _DECIMAL:
            record[spec.name] = value
        else:
            record[spec.name] = hex(value)
    return record


def item_json(item: Item) -> dict[str, Any]:
    if isinstance(item, Burst):
        lanes = [
            {"vcpu": vcpu, "operations": [_op_json(op) for op in ops]} for vcpu, ops in item.lanes
        ]
        return {"burst": {"seed": item.seed, "lanes": lanes}}
    return _op_json(item)


def config_json(config: VmConfig) -> dict[str, Any]:
    return {
        "vcpus": config.vcpus,
        "noncoherent_dma": config.noncoherent_dma,
        "guest_maxphyaddr": config.guest_maxphyaddr,
        "quirk_cd_nw_cleared": config.quirk_cd_nw_cleared,
        "feature_mtrr": config.feature_mtrr,
        "tdp": config.tdp,
        "max_mapping_level": config.max_mapping_level.label,
        "precedence": config.precedence.value,
        "memslots": [
            {
                "base_gpa": hex(slot.base_gfn << PAGE_SHIFT),
                "size_bytes": hex(slot.pages << PAGE_SHIFT),
                "kind": slot.kind.value,
                "name": slot.name,
            }
            for slot in config.memslots
        ],
    }


def lines(trace: Trace) -> Iterator[str]:
    header = {
        "format": FORMAT,
        "version": VERSION,
        "workload": trace.workload,
        "params": dict(trace.params),
        "vm": config_json(trace.config),
    }
    yield json.dumps(header, sort_keys=True)
    for item in trace.items:
        yield json.dumps(item_json(item), separators=(",", ":"))


def save(trace: Trace, path: Path) -> None:
    """Write ``trace`` as JSON Lines."""
    with path.open("w") as out:
        for line in lines(trace):
            out.write(line + "\n")


# -- reading ------------------------------------------------------------------------------


_T = TypeVar("_T")


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.line = 0

    def fail(self, why: str) -> TraceFormatError:
        return TraceFormatError(self.source, self.line, why)

    def checked(self, read: Callable[[Any], _T], value: Any) -> _T:
        """``read(value)``, a domain error it raises made this line's format error."""
        try:
            return read(value)
        except TraceFormatError:
            raise
        except MtrremuError as error:
            raise self.fail(str(error)) from None

    def number(self, record: Mapping[str, Any], key: str, *, bits: int = 64) -> int:
        if key not in record:
            raise self.fail(f"missing {key!r}")
        raw = record[key]
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise self.fail(f'{key!r} must be an integer or a "0x…" string, not {raw!r}')
        try:
            value = int(raw, 0) if isinstance(raw, str) else raw
        except ValueError:
            raise self.fail(f"{key!r} is not a number: {raw!r}") from None
        if not 0 <= value < 1 << bits:
            raise self.fail(f"{key!r} = {raw!r} does not fit in {bits} bits")
        return value

    def flag(self, record: Mapping[str, Any], key: str, default: bool = False) -> bool:
        raw = record.get(key, default)
        if not isinstance(raw, bool):
            raise self.fail(f"{key!r} must be true or false, not {raw!r}")
        return raw

    def op(self, record: Any, *, in_burst: bool) -> Op:
        if not isinstance(record, dict):
            raise self.fail(f"an operation must be an object, not {record!r}")
        kind = BY_NAME.get(record.get("op"))  # type: ignore[arg-type]
        if kind is None:
            raise self.fail(f"unknown operation {record.get('op')!r}; known: {', '.join(BY_NAME)}")
        if in_burst and not kind.per_vcpu:
            raise self.fail(f"{kind.name} cannot be part of a burst")
        values: dict[str, Any] = {}
        for spec in kind.fields:
            if spec.name == "msrs":
                values["msrs"] = self.msrs(record)
            elif spec.type in ("bool", bool):
                values[spec.name] = self.flag(record, spec.name)
            elif spec.name == "vcpu" and spec.default is not dataclasses.MISSING:
                values["vcpu"] = self.number(record, "vcpu", bits=32) if "vcpu" in record else 0
            else:
                bits = 32 if spec.name in ("vcpu", "msr") else 64
                values[spec.name] = self.number(record, spec.name, bits=bits)
        unknown = set(record) - {"op", *values}
        if unknown:
            raise self.fail(f"{kind.name} has no field {sorted(unknown)[0]!r}")
        op: Op = kind.type(**values)
        if isinstance(op, FaultRange):
            for name in ("start_gpa", "end_gpa"):
                if getattr(op, name) % PAGE_SIZE:
                    raise self.fail(f"{name!r} = {getattr(op, name):#x} is not 4 KiB aligned")
            if op.end_gpa <= op.start_gpa:
                raise self.fail("fault_range needs start_gpa < end_gpa")
        return op

    def msrs(self, record: Mapping[str, Any]) -> tuple[MsrValue, ...]:
        entries = record.get("msrs")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise self.fail('"msrs" must be a list of {"msr", "value"} objects')
        return tuple(
            MsrValue(self.number(e, "msr", bits=32), self.number(e, "value")) for e in entries
        )

    def item(self, record: Any) -> Item:
        if isinstance(record, dict) and "burst" in record:
            burst = record["burst"]
            if not isinstance(burst, dict) or not isinstance(burst.get("lanes"), list):
                raise self.fail('a burst needs a "lanes" list')
            lanes = []
            seen = set()
            for lane in burst["lanes"]:
                if not isinstance(lane, dict) or not isinstance(lane.get("operations"), list):
                    raise self.fail('each burst lane needs "vcpu" and an "operations" list')
                vcpu = self.number(lane, "vcpu", bits=32)
                if vcpu in seen:
                    raise self.fail(f"burst has two lanes for vCPU {vcpu}")
                seen.add(vcpu)
                ops: list[VcpuOp] = []
                for raw in lane["operations"]:
                    op = cast(VcpuOp, self.op(raw, in_burst=True))
                    if op.vcpu != vcpu:
                        raise self.fail(f"burst lane of vCPU {vcpu} holds an op of vCPU {op.vcpu}")
                    ops.append(op)
                lanes.append((vcpu, tuple(ops)))
            if not any(ops for _, ops in lanes):
                raise self.fail("a burst needs at least one operation")
            return Burst(tuple(lanes), self.number(burst, "seed") if "seed" in burst else 0)
        return self.op(record, in_burst=False)

    def config(self, vm: Any) -> VmConfig:
        if not isinstance(vm, dict):
            raise self.fail('the header needs a "vm" object')
        slots = vm.get("memslots")
        if not isinstance(slots, list) or not slots:
            raise self.fail('"vm" needs a non-empty "memslots" list')
        memslots = []
        for slot in slots:
            if not isinstance(slot, dict):
                raise self.fail(f"a memslot must be an object, not {slot!r}")
            kind = slot.get("kind", "ram")
            if kind not in ("ram", "device"):
                raise self.fail(f'memslot kind must be "ram" or "device", not {kind!r}')
            memslots.append(
                Memslot.from_bytes(
                    self.number(slot, "base_gpa"),
                    self.number(slot, "size_bytes"),
                    MemslotKind(kind),
                    str(slot.get("name", "")),
                )
            )
        try:
            level = Level.parse(str(vm.get("max_mapping_level", "1G")))
            precedence = Precedence(vm.get("precedence", "kvm"))
        except ValueError as error:
            raise self.fail(str(error)) from None
        return VmConfig(
            vcpus=self.number(vm, "vcpus", bits=16),
            noncoherent_dma=self.number(vm, "noncoherent_dma") if "noncoherent_dma" in vm else 1,
            guest_maxphyaddr=(
                self.number(vm, "guest_maxphyaddr")
                if "guest_maxphyaddr" in vm
                else VmConfig.guest_maxphyaddr
            ),
            quirk_cd_nw_cleared=self.flag(vm, "quirk_cd_nw_cleared", True),
            feature_mtrr=self.flag(vm, "feature_mtrr", True),
            tdp=self.flag(vm, "tdp", True),
            memslots=tuple(memslots),
            max_mapping_level=level,
            precedence=precedence,
        )


def vm_config(vm: Any, source: str) -> VmConfig:
    """A VM from an object shaped as a header's ``vm`` (a memslot file's contents too); a
    malformed one raises :class:`TraceFormatError` on line 1 of ``source``."""
    reader = _Reader(source)
    reader.line = 1
    return reader.checked(reader.config, vm)


def parse(text_lines: Iterable[str], source: str = "<trace>") -> Trace:
    """A trace from JSON Lines, its items held in columns (:class:`TraceItems`); a malformed
    line raises :class:`TraceFormatError`.

    Lines exactly as :func:`lines` writes them are read by a pattern compiled from the
    operation table; any other line goes through the JSON parser and the full checks (both
    give the same items: a test compares them)."""
    reader = _Reader(source)
    header: dict[str, Any] | None = None
    config: VmConfig | None = None
    items = TraceItems()
    vcpus = 0
    for number, text in enumerate(text_lines, start=1):
        if header is not None:
            row = _canonical_row(text)
            if row is not None and row[1] < vcpus:
                items.append_row(*row)
                continue
        reader.line = number
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise reader.fail(f"not JSON: {error.msg} (column {error.colno})") from None
        if header is None:
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise reader.fail(f'the first line must be a header with "format": "{FORMAT}"')
            version = record.get("version")
            if type(version) is not int or version != VERSION:
                raise reader.fail(f"unsupported version {version!r} (want {VERSION})")
            config = reader.checked(reader.config, record.get("vm"))
            header, vcpus = record, config.vcpus
            continue
        item = reader.checked(reader.item, record)
        _check_vcpus(reader, item, vcpus)
        items.append(item)
    if header is None or config is None:
        raise TraceFormatError(source, max(reader.line, 1), "empty trace: no header line")
    params = header.get("params", {})
    if not isinstance(params, dict):
        raise TraceFormatError(source, 1, '"params" must be an object')
    items.seal()
    return Trace(str(header.get("workload", "trace")), config, items, params)


def _canonical_pattern(layout: Layout) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """The line :func:`lines` writes for ``layout``'s kind, as a pattern, and what each group
    is: ``v`` (the vCPU), ``a``/``b`` (integer fields) or ``f<bit>`` (a flag). The pattern
    admits only values the full checks accept (32-bit MSR indices, 64-bit numbers); the vCPU
    is checked against the VM by the caller."""
    parts = [re.escape(f'{{"op":"{layout.kind.name}"')]
    roles = []
    for spec in layout.kind.fields:
        if spec.name == "vcpu":
            parts.append(',"vcpu":(0|[1-9][0-9]{0,9})')
            roles.append("v")
        elif spec.name in layout.ints:
            digits = 8 if spec.name == "msr" else 16
            parts.append(f',"{spec.name}":"0x(0|[1-9a-f][0-9a-f]{{0,{digits - 1}}})"')
            roles.append("ab"[layout.ints.index(spec.name)])
        else:
            parts.append(f',"{spec.name}":(true|false)')
            roles.append(f"f{layout.flags.index(spec.name)}")
    parts.append(r"\}\s*")
    return re.compile("".join(parts)), tuple(roles)


#: Canonical line patterns by operation name. A fault range's alignment is checked by the full
#: path only, so its lines always take it (they are few).
_CANONICAL = {
    layout.kind.name: (layout.index, *_canonical_pattern(layout))
    for layout in LAYOUTS
    if layout is not None and layout.kind.type is not FaultRange
}
_OP_PREFIX = '{"op":"'


@functools.lru_cache(maxsize=8192)
def _canonical_row(text: str) -> tuple[int, int, int, int, int] | None:
    """``(kind index, vcpu, a, b, flags)`` of a line exactly as :func:`lines` writes it.

    Remembered for the last 8,192 distinct lines (about a megabyte): a long trace repeats the
    same lines (firmware programming the same MTRRs on every vCPU, CD flips) over and over."""
    if not text.startswith(_OP_PREFIX):
        return None
    end = text.find('"', len(_OP_PREFIX))
    known = _CANONICAL.get(text[len(_OP_PREFIX) : end])
    if known is None:
        return None
    index, pattern, roles = known
    match = pattern.fullmatch(text)
    if match is None:
        return None
    vcpu = a = b = flags = 0
    for role, value in zip(roles, match.groups(), strict=True):
        if role == "v":
            vcpu = int(value)
        elif role == "a":
            a = int(value, 16)
        elif role == "b":
            b = int(value, 16)
        elif value == "true":
            flags |= 1 << int(role[1])
    return index, vcpu, a, b, flags


def _check_vcpus(reader: _Reader, item: Item, vcpus: int) -> None:
    ops: Iterable[object] = (
        [op for _, lane in item.lanes for op in lane] if isinstance(item, Burst) else [item]
    )
    for op in ops:
        index = getattr(op, "vcpu", None)
        if index is not None and index >= vcpus:
            raise reader.fail(f"vCPU {index} does not exist (the trace's VM has {vcpus})")


def load(path: Path) -> Trace:
    """Read and validate a trace file."""
    try:
        with path.open("rb") as source:
            return parse(_decoded(source, str(path)), str(path))
    except OSError as error:
        raise InvalidArgument(f"cannot read trace {path}: {error.strerror or error}") from None


def _decoded(source: Iterable[bytes], name: str) -> Iterator[str]:
    """The file's lines as text; a line that is not UTF-8 is a format error on that line."""
    for number, raw in enumerate(source, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TraceFormatError(name, number, "not UTF-8 text") from None
