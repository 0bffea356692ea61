"""The zap-strategy interface: what a strategy sees, what it decides, and KVM's shared rules.

A strategy answers one question per memtype event: *what to zap, and how*. It returns a
:class:`ZapDecision`; the VM's zap engine carries it out (directly, or through patch 9's zap
list, split by memslot or not), counts it and reports it. The VM calls the strategy directly
(no hook dispatch) and only for events that can matter:

* ``on_mtrr_write`` — after an accepted range or default-type MTRR write (guest or host), while
  the VM honours guest MTRRs;
* ``on_cd_toggle`` — after a guest CR0 write that flipped CD, while the VM honours guest MTRRs
  (host writes, RESET and INIT never reach a strategy);
* ``on_dma_transition`` — when the non-coherent DMA count goes 0→1 or 1→0 with EPT on;
* ``on_host_cd_change`` (optional) — after a host CR0 write (KVM_SET_SREGS) or a RESET flipped
  CD, while the VM honours guest MTRRs. KVM does not zap there; a strategy without this method
  is not called, and the VM does nothing.

Views are read-only and valid only during the call. :func:`memtype_map` and
:func:`changed_ranges` give a strategy the exact effect of an event on a vCPU's memory types.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mtrremu.core import cr0 as cr0_bits
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.fault import FaultView, Memslots
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import EptMemtype, Profile, disabled_type
from mtrremu.core.mtrr_state import MtrrState
from mtrremu.core.units import U64_MASK, ZAP_ALL, GfnRange, gpa_to_gfn


class Route(enum.Enum):
    """How the zap engine runs a decision's ranges."""

    #: Zap each range at once, on the requesting vCPU (``kvm_zap_gfn_range``).
    DIRECT = "direct"
    #: Queue on the VM-wide zap list, then drain it or wait for the vCPU draining it (patch 9).
    #: The drain-or-wait happens even when nothing was queued.
    LIST = "list"
    #: Zap nothing now: mark the root entries overlapping each range for re-evaluation (Xen's
    #: approach). An access through a mark re-evaluates memory types on its path with the
    #: accessing vCPU's view (docs/semantics.md#deferred-re-evaluation).
    MARK = "mark"


class MmuLock(enum.Enum):
    """How a strategy's zaps hold the MMU lock (docs/semantics.md#patch-12)."""

    #: Exclusively, as KVM's zaps do: every entry overlapping the range is visited.
    WRITE = "write"
    #: Shared (patch 12): entries wholly inside the range are zapped where they stand, whole
    #: subtrees at once; a huge leaf straddling the range's edge is left in place.
    READ = "read"


class AllocFailure(enum.Enum):
    """What a LIST decision does if queueing a range fails to allocate (patch 9 vs patch 10)."""

    #: Zap the requested ranges directly; no drain or wait (patch 9's fallback).
    ZAP_REQUEST = "zap-request"
    #: Empty the whole list, other vCPUs' ranges too, and zap all directly (patch 10's).
    CLEAR_LIST_AND_ZAP_ALL = "clear-list-and-zap-all"


@dataclass(frozen=True)
class ZapDecision:
    """A strategy's answer to one event.

    ``zap_event`` says the event reached a zap path (counted as a "zap cnt" event even when
    ``ranges`` is empty). ``split_by_memslot`` cuts each range into its intersections with the
    memslots before queueing, dropping the parts outside every slot (patch 11).
    """

    zap_event: bool = False
    ranges: tuple[GfnRange, ...] = ()
    route: Route = Route.DIRECT
    split_by_memslot: bool = False
    on_alloc_failure: AllocFailure = AllocFailure.ZAP_REQUEST

    def __post_init__(self) -> None:
        # Plugins build decisions: a malformed one fails here, inside the plugin's own call,
        # where the VM reports it as that strategy's failure instead of crashing later.
        if type(self.ranges) is not tuple:
            raise TypeError(f"ZapDecision.ranges must be a tuple of GfnRange, not {self.ranges!r}")
        for rng in self.ranges:
            if not (
                isinstance(rng, GfnRange)
                and type(rng.start) is int
                and type(rng.end) is int
                and 0 <= rng.start <= U64_MASK
                and 0 <= rng.end <= U64_MASK
            ):
                raise TypeError(f"ZapDecision.ranges holds {rng!r}, not a GfnRange of u64 gfns")
        if not isinstance(self.route, Route) or not isinstance(self.on_alloc_failure, AllocFailure):
            raise TypeError("ZapDecision.route and on_alloc_failure must be Route and AllocFailure")


#: Not a zap path: nothing counted, nothing zapped.
NO_ZAP = ZapDecision()


class MtrrView:
    """Read-only access to one vCPU's MTRRs."""

    __slots__ = ("_state",)

    def __init__(self, state: MtrrState) -> None:
        self._state = state

    @property
    def enabled(self) -> bool:
        """MTRRdefType.E."""
        return self._state.enabled

    @property
    def fixed_enabled(self) -> bool:
        """MTRRdefType.FE."""
        return self._state.fixed_enabled

    @property
    def default_type(self) -> int:
        return self._state.default_type

    def fixed_types(self) -> bytes:
        """The 88 fixed-range type bytes, lowest address first."""
        return bytes(self._state.fixed)

    def valid_ranges(self) -> list[tuple[GfnRange, int]]:
        """``(gfns, type)`` of every valid variable pair, in KVM's list order."""
        return self._state.valid_ranges()

    def pair_range(self, pair: int) -> GfnRange:
        """A pair's span from its stored base and mask (V ignored), as KVM computes it."""
        return self._state.var_range_gfns(pair)

    def read(self, msr: int) -> int:
        return self._state.read(msr)

    def snapshot(self) -> tuple[int, ...]:
        """Every MTRR MSR as read back: equal snapshots give equal memory types."""
        return self._state.snapshot()

    def before_write(self) -> MtrrView:
        """These MTRRs as they were before the write being handled (in ``on_mtrr_write``)."""
        return MtrrView(self._state.before_last_write())


class _VcpuState(Protocol):
    index: int
    cr0: int
    mtrr: MtrrState


class VcpuView:
    """The vCPU an event happened on: a live, read-only view (one per vCPU, reused)."""

    __slots__ = ("_state", "mtrr")

    def __init__(self, state: _VcpuState) -> None:
        self._state = state
        self.mtrr = MtrrView(state.mtrr)

    @property
    def index(self) -> int:
        return self._state.index

    @property
    def cr0(self) -> int:
        return self._state.cr0

    @property
    def cd(self) -> bool:
        return bool(self._state.cr0 & cr0_bits.CD)


@dataclass(frozen=True)
class VmView:
    """The VM-wide facts a strategy may use, every vCPU's view included."""

    config: VmConfig
    profile: Profile
    noncoherent_dma: int
    vcpus: tuple[VcpuView, ...] = ()
    slots: Memslots | None = field(default=None, repr=False, compare=False)

    @property
    def memslots(self) -> tuple[Memslot, ...]:
        return self.config.sorted_memslots()

    def cd_memtype(self) -> EptMemtype:
        """What a fault by a vCPU with CR0.CD=1 installs (patch 8's ``cd_type``/``cd_ipat``)."""
        return self.profile.cd_memtype(self.config.quirk_cd_nw_cleared)

    def effective_default_type(self, vcpu: VcpuView) -> int:
        """The default type if MTRRs are enabled, else the disabled type."""
        if vcpu.mtrr.enabled:
            return vcpu.mtrr.default_type
        return int(disabled_type(self.config.feature_mtrr))


@runtime_checkable
class ZapStrategy(Protocol):
    """What a zap strategy implements. See the module docstring for when each is called."""

    def on_mtrr_write(self, vm: VmView, vcpu: VcpuView, msr: int) -> ZapDecision: ...

    def on_cd_toggle(self, vm: VmView, vcpu: VcpuView) -> ZapDecision: ...

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision: ...


#: The methods of :class:`ZapStrategy`, in the order the module docstring lists them.
STRATEGY_HOOKS = ("on_mtrr_write", "on_cd_toggle", "on_dma_transition")
#: Methods a strategy may implement besides them (same signature as ``on_cd_toggle``).
OPTIONAL_HOOKS = ("on_host_cd_change",)


def protocol_gaps(strategy: object) -> list[str]:
    """What ``strategy`` lacks of :class:`ZapStrategy`: the missing or non-callable methods."""
    return [name for name in STRATEGY_HOOKS if not callable(getattr(strategy, name, None))]


@dataclass(frozen=True)
class StrategyFailure:
    """A strategy call that raised or returned something other than a :class:`ZapDecision`.

    The event itself still took effect; the VM replaced the strategy's answer with a zap of
    everything (never wrong, only costly), so the EPT stays consistent with the guest state.
    """

    #: The strategy method that failed (one of :data:`STRATEGY_HOOKS`).
    hook: str
    #: What went wrong, e.g. ``"raised KeyError: 3"`` or ``"returned None, not a ZapDecision"``.
    error: str

    def __str__(self) -> str:
        return f"{self.hook} {self.error}"


def kvm_mtrr_write_range(vcpu: VcpuView, msr: int) -> GfnRange | None:
    """The range KVM's ``update_mtrr`` zaps after a write to ``msr``, or ``None`` if it returns
    early (MTRRs disabled and not defType; a fixed MSR with FE=0).

    defType zaps everything; a fixed MSR its own span; a variable MSR its pair's span from the
    stored base and mask after the write (a base write uses the old mask), V ignored.
    """
    mtrr = vcpu.mtrr
    if msr == msrs.DEFTYPE:
        return ZAP_ALL
    if not mtrr.enabled:
        return None
    if msrs.is_fixed_msr(msr):
        if not mtrr.fixed_enabled:
            return None
        start, end = msrs.fixed_msr_gpa_span(msr)
        return GfnRange(gpa_to_gfn(start), gpa_to_gfn(end))
    if msrs.is_var_msr(msr):
        pair, _ = msrs.var_pair(msr)
        return mtrr.pair_range(pair)
    raise ValueError(f"{msrs.msr_name(msr)} does not affect memory types")


def memtype_map(
    vm: VmView,
    vcpu: VcpuView,
    *,
    cd: bool | None = None,
    noncoherent_dma: bool | None = None,
    mtrr: MtrrView | None = None,
) -> IntervalMap:
    """What a fault by ``vcpu`` would install, per gfn: an :class:`IntervalMap` of encoded leaf
    bytes (type, IPAT and the present bit; 0 outside every memslot).

    The vCPU's state as it is now, unless ``cd``, ``noncoherent_dma`` (attached or not) or
    ``mtrr`` (e.g. ``vcpu.mtrr.before_write()``) say otherwise. Built per segment of the MTRRs
    and memslots (O(ranges), never per page), by the very rules a fault uses, and remembered
    by everything it depends on (the last :data:`_MAPS_KEPT`): vCPUs replaying the same
    sequence ask for the same maps. The map is shared: read it, never change it.
    """
    state = (vcpu.mtrr if mtrr is None else mtrr)._state
    dma = vm.noncoherent_dma > 0 if noncoherent_dma is None else noncoherent_dma
    cd = vcpu.cd if cd is None else cd
    key = (vm.profile, vm.config, dma, cd, state.registers(), tuple(state.order))
    with _maps_lock:
        found = _maps.get(key)
    if found is not None:
        return found
    slots = vm.slots if vm.slots is not None else Memslots(vm.config)
    view = FaultView(vm.profile, vm.config, slots, dma, cd, state)
    built = IntervalMap.build(view.breakpoints(), view.leaf_byte)
    with _maps_lock:
        if len(_maps) >= _MAPS_KEPT:
            del _maps[next(iter(_maps))]
        _maps[key] = built
    return built


#: How many memtype maps :func:`memtype_map` remembers (a few KiB each), oldest dropped first.
_MAPS_KEPT = 256
_maps: dict[tuple[object, ...], IntervalMap] = {}
_maps_lock = threading.Lock()


def changed_ranges(before: IntervalMap, after: IntervalMap) -> tuple[GfnRange, ...]:
    """The gfn ranges where two memory-type maps differ, sorted, abutting ones merged."""
    starts, ends = before.differences(after)
    return merge_ranges(zip(starts.tolist(), ends.tolist(), strict=True))


def merge_ranges(spans: Iterable[tuple[int, int]]) -> tuple[GfnRange, ...]:
    """``[start, end)`` spans as sorted ranges, overlapping or abutting ones merged."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple(GfnRange(start, end) for start, end in merged)
