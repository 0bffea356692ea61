"""A VM's complete state as plain data: what a snapshot holds (docs/snapshots.md).

:func:`capture` reads it from a live VM, whole and consistent; :func:`restore` loads it into a
VM just created from the same configuration and strategy, after checking every value the way
the emulator checks a host write, so a state that passes is one the emulator could have
reached. The JSON form (:func:`state_document`, :func:`parse_state_document`) holds all but
the EPT's arrays, which travel as arrays.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mtrremu.core import cr0 as cr0_bits
from mtrremu.core import msrs
from mtrremu.core.config import MAX_DMA_DEVICES, Memslot, MemslotKind, VmConfig
from mtrremu.core.counters import COUNTER_NAMES, Counters
from mtrremu.core.ept import EptImage, EptStore
from mtrremu.core.errors import InvalidConfig, InvalidSnapshot
from mtrremu.core.oracle import StalenessLog
from mtrremu.core.vm import Vm, mmio_table_budget

T = TypeVar("T")


@dataclass(frozen=True)
class VcpuImage:
    """One vCPU's registers: CR0, PAT, every MTRR MSR as read back (in
    :data:`msrs.MTRR_MSRS` order), the order of the valid variable pairs in KVM's list, and
    the pairs whose PhysMask was never written (KVM stores those as 0, a written one with the
    bits above MAXPHYADDR: both read back alike, but a later PhysBase write zaps differently)."""

    cr0: int
    pat: int
    mtrrs: tuple[int, ...]
    pair_order: tuple[int, ...]
    unset_masks: tuple[int, ...]


@dataclass(frozen=True)
class VmState:
    """Everything that makes a VM what it is. The strategy is named, with its options: its
    per-VM state is the EPT's (re-evaluation marks included)."""

    vm_id: str
    #: The client that owns the VM on its server (docs/api.md#clients).
    owner: str
    strategy: str
    options: Mapping[str, str]
    config: VmConfig
    noncoherent_dma: int
    vcpus: tuple[VcpuImage, ...]
    counters: Counters
    staleness: StalenessLog
    ept: EptImage

    @property
    def leaf_total(self) -> int:
        """Present leaves in the EPT."""
        return sum(int((self.ept.entries[level] >= 0x80).sum()) for level in self.ept.entries)

    def same_as(self, other: VmState) -> bool:
        """Equal field for field, the EPT included."""
        plain = ("vm_id", "owner", "strategy", "config", "noncoherent_dma", "vcpus", "counters")
        return (
            all(getattr(self, name) == getattr(other, name) for name in plain)
            and dict(self.options) == dict(other.options)
            and self.staleness == other.staleness
            and self.ept.same_as(other.ept)
        )


def capture(vm: Vm, options: Mapping[str, str], owner: str) -> VmState:
    """``vm``'s state, read with the VM idle (see :meth:`Vm.idle`); ``options`` are the
    strategy options the VM was created with, ``owner`` the client owning it."""
    with vm.idle():
        return VmState(
            vm_id=vm.vm_id,
            owner=owner,
            strategy=vm.strategy_name,
            options=dict(options),
            config=vm.config,
            noncoherent_dma=vm.noncoherent_dma,
            vcpus=tuple(
                VcpuImage(
                    vc.cr0,
                    vc.pat,
                    vc.mtrr.snapshot(),
                    tuple(vc.mtrr.order),
                    vc.mtrr.unset_masks(),
                )
                for vc in vm.vcpus
            ),
            counters=vm.counters.copy(),
            staleness=dataclasses.replace(vm.staleness, excused=dict(vm.staleness.excused)),
            ept=vm.store.image(),
        )


def restore(vm: Vm, state: VmState) -> None:
    """Load ``state`` into ``vm``, created from ``state.config`` and ``state.strategy`` and not
    yet used. Raises :class:`InvalidSnapshot` (and leaves ``vm`` to be discarded) if a value
    is one the emulator would refuse."""
    if not 0 <= state.noncoherent_dma <= MAX_DMA_DEVICES:
        raise InvalidSnapshot(f"{state.noncoherent_dma} non-coherent DMA devices")
    if len(state.vcpus) != len(vm.vcpus):
        raise InvalidSnapshot(f"{len(state.vcpus)} vCPU states for a VM of {len(vm.vcpus)} vCPUs")
    rules = msrs.write_rules(vm.config.guest_maxphyaddr)
    for vc, image in zip(vm.vcpus, state.vcpus, strict=True):
        where = f"vCPU {vc.index}"
        why = cr0_bits.rejection(image.cr0)
        if why is not None or cr0_bits.guest_value(image.cr0) != image.cr0:
            raise InvalidSnapshot(f"{where}: CR0 {image.cr0:#x} cannot be held ({why})")
        if len(image.mtrrs) != len(msrs.MTRR_MSRS):
            raise InvalidSnapshot(f"{where}: {len(image.mtrrs)} MTRR values")
        for msr, value in ((msrs.PAT, image.pat), *zip(msrs.MTRR_MSRS, image.mtrrs, strict=True)):
            why = rules.rejection(msr, value) if 0 <= value < 1 << 64 else "not a u64"
            if why is not None:
                raise InvalidSnapshot(f"{where}: {msrs.msr_name(msr)} = {value:#x}: {why}")
            if msr != msrs.PAT:
                vc.mtrr.write(msr, value)
        valid = {pair for pair in range(msrs.VAR_PAIRS) if vc.mtrr.pair_valid(pair)}
        if sorted(image.pair_order) != sorted(valid):
            raise InvalidSnapshot(
                f"{where}: variable pair order {list(image.pair_order)} does not list exactly "
                f"the valid pairs {sorted(valid)}"
            )
        vc.mtrr.order = list(image.pair_order)
        for pair in image.unset_masks:
            if not 0 <= pair < msrs.VAR_PAIRS or vc.mtrr.read(msrs.PHYSBASE0 + 2 * pair + 1):
                raise InvalidSnapshot(f"{where}: PhysMask{pair} cannot be unset and nonzero")
            vc.mtrr.masks[pair] = 0
        vc.cr0, vc.pat = image.cr0, image.pat
    try:
        store = EptStore.from_image(state.ept, mmio_table_budget(vm.config))
    except ValueError as error:
        raise InvalidSnapshot(f"EPT: {error}") from None
    vm.load(store, state.noncoherent_dma, state.counters, state.staleness)


# -- the JSON form ---------------------------------------------------------------------------


def state_document(state: VmState) -> dict[str, Any]:
    """Everything but the EPT's arrays, as JSON-ready data."""
    return {
        "vm_id": state.vm_id,
        "owner": state.owner,
        "strategy": state.strategy,
        "options": dict(state.options),
        "config": _config_document(state.config),
        "noncoherent_dma": state.noncoherent_dma,
        "vcpus": [dataclasses.asdict(image) for image in state.vcpus],
        "counters": dataclasses.asdict(state.counters),
        "staleness": dataclasses.asdict(state.staleness),
        "mmio_tables": state.ept.mmio_tables,
    }


def parse_state_document(document: object, ept: EptImage) -> VmState:
    """The state :func:`state_document` described, with ``ept``'s arrays (whose
    ``mmio_tables`` this replaces). Raises :class:`InvalidSnapshot` on any missing, extra or
    ill-typed field."""
    doc = _fields(document, "the state", _DOCUMENT_FIELDS)
    options = _fields(doc["options"], "options", None)
    if not all(isinstance(v, str) for v in options.values()):
        raise InvalidSnapshot("strategy option values must be strings")
    vcpus = doc["vcpus"]
    if not isinstance(vcpus, list):
        raise InvalidSnapshot("vcpus is not a list")
    return VmState(
        vm_id=_typed(doc["vm_id"], str, "vm_id"),
        owner=_typed(doc["owner"], str, "owner"),
        strategy=_typed(doc["strategy"], str, "strategy"),
        options=options,
        config=parse_config(doc["config"]),
        noncoherent_dma=_typed(doc["noncoherent_dma"], int, "noncoherent_dma"),
        vcpus=tuple(_parse_vcpu(item, i) for i, item in enumerate(vcpus)),
        counters=Counters(**_counts(doc["counters"], "counters", _COUNTER_FIELDS)),
        staleness=_parse_staleness(doc["staleness"]),
        ept=dataclasses.replace(ept, mmio_tables=_typed(doc["mmio_tables"], int, "mmio_tables")),
    )


_DOCUMENT_FIELDS = frozenset(
    [
        "vm_id",
        "owner",
        "strategy",
        "options",
        "config",
        "noncoherent_dma",
        "vcpus",
        "counters",
        "staleness",
        "mmio_tables",
    ]
)
_COUNTER_FIELDS = frozenset(COUNTER_NAMES)
_CONFIG_DEFAULTS = VmConfig()


def _config_document(config: VmConfig) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for f in dataclasses.fields(VmConfig):
        value, default = getattr(config, f.name), getattr(_CONFIG_DEFAULTS, f.name)
        if isinstance(default, enum.Enum):
            document[f.name] = type(default)(value).name
        elif f.name == "memslots":
            document[f.name] = [
                {**dataclasses.asdict(slot), "kind": slot.kind.value} for slot in value
            ]
        else:
            document[f.name] = value
    return document


def parse_config(document: object) -> VmConfig:
    """The configuration :func:`state_document` described (fully checked)."""
    doc = _fields(document, "config", frozenset(f.name for f in dataclasses.fields(VmConfig)))
    values: dict[str, Any] = {}
    for name, raw in doc.items():
        default = getattr(_CONFIG_DEFAULTS, name)
        if isinstance(default, enum.Enum):
            members = type(default).__members__
            if raw not in members:
                raise InvalidSnapshot(f"config {name}: {raw!r} is not one of {', '.join(members)}")
            values[name] = members[raw]
        elif name == "memslots":
            if not isinstance(raw, list):
                raise InvalidSnapshot("config memslots is not a list")
            values[name] = tuple(_parse_memslot(slot) for slot in raw)
        else:
            values[name] = _typed(raw, type(default), f"config {name}")
    try:
        return VmConfig(**values)
    except InvalidConfig as error:
        raise InvalidSnapshot(f"config: {error}") from None


def _parse_memslot(document: object) -> Memslot:
    doc = _fields(document, "a memslot", frozenset(("base_gfn", "pages", "kind", "name")))
    try:
        kind = MemslotKind(doc["kind"])
    except ValueError:
        raise InvalidSnapshot(f"memslot kind {doc['kind']!r} is unknown") from None
    return Memslot(
        _typed(doc["base_gfn"], int, "memslot base_gfn"),
        _typed(doc["pages"], int, "memslot pages"),
        kind,
        _typed(doc["name"], str, "memslot name"),
    )


def _parse_vcpu(document: object, index: int) -> VcpuImage:
    where = f"vCPU {index}"
    names = ("mtrrs", "pair_order", "unset_masks")
    doc = _fields(document, where, frozenset(("cr0", "pat", *names)))
    lists = {}
    for name in names:
        raw = doc[name]
        if not isinstance(raw, list):
            raise InvalidSnapshot(f"{where}: {name} is not a list")
        lists[name] = tuple(_typed(v, int, f"{where} {name}") for v in raw)
    return VcpuImage(
        _typed(doc["cr0"], int, f"{where} cr0"),
        _typed(doc["pat"], int, f"{where} pat"),
        lists["mtrrs"],
        lists["pair_order"],
        lists["unset_masks"],
    )


def _parse_staleness(document: object) -> StalenessLog:
    names = frozenset(f.name for f in dataclasses.fields(StalenessLog))
    doc = _fields(document, "staleness", names)
    counts = {n: doc[n] for n in names - {"excused", "first_stale_event"}}
    return StalenessLog(
        **_counts(counts, "staleness", None),
        excused=_counts(doc["excused"], "staleness excused", None),
        first_stale_event=_typed(doc["first_stale_event"], str, "first_stale_event"),
    )


def _fields(document: object, what: str, names: frozenset[str] | None) -> dict[str, Any]:
    """``document`` as an object with string keys, exactly ``names`` if given."""
    if not isinstance(document, dict) or not all(isinstance(k, str) for k in document):
        raise InvalidSnapshot(f"{what} is not an object")
    if names is not None and set(document) != names:
        missing, extra = sorted(names - set(document)), sorted(set(document) - names)
        raise InvalidSnapshot(f"{what}: missing {missing or 'nothing'}, unknown {extra or 'none'}")
    return document


def _counts(document: object, what: str, names: frozenset[str] | None) -> dict[str, int]:
    doc = _fields(document, what, names)
    for name, value in doc.items():
        if _typed(value, int, f"{what} {name}") < 0:
            raise InvalidSnapshot(f"{what} {name} is negative")
    return doc


def _typed(value: object, kind: type[T], what: str) -> T:
    """``value`` if it is a ``kind`` (a bool is not an int here)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidSnapshot(f"{what} is not a{'n' if kind is int else ''} {kind.__name__}")
    return value
