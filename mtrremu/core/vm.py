"""A VM: vCPUs, memslots, one EPT, a zap strategy, and the events that drive them.

Every event runs on the calling thread; one thread per vCPU may drive a VM concurrently. Lock
order: the DMA lock (a DMA transition), a vCPU's lock, then the MMU lock (EPT), then the VM
lock (counters, DMA count); the zap list has its own lock and never calls out while holding it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from mtrremu.core import cr0 as cr0_bits
from mtrremu.core import msrs
from mtrremu.core.config import MAX_DMA_DEVICES, VmConfig
from mtrremu.core.counters import Counters
from mtrremu.core.ept import EptStore, decode_leaf, encode_leaf, merge_runs
from mtrremu.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MtrremuError,
    RejectedHostWrite,
    ResourceExhausted,
    UnknownVcpu,
)
from mtrremu.core.event_filter import ALL_EVENTS, EventFilter
from mtrremu.core.events import (
    Access,
    AccessInfo,
    AccessKind,
    AttachDma,
    CheckStaleness,
    DetachDma,
    EventResult,
    FaultRange,
    Init,
    Lookup,
    LookupGpa,
    Mapping,
    MsrValue,
    Op,
    PopulateInfo,
    ReadCounters,
    ReadMsr,
    ReadVcpuState,
    Reset,
    StalenessAnswer,
    VcpuState,
    WriteCr0,
    WriteMsr,
    WriteMsrs,
)
from mtrremu.core.fault import FaultPlan, FaultView, Memslots
from mtrremu.core.interval_map import IntervalMap
from mtrremu.core.memtype import Profile
from mtrremu.core.mtrr_state import MtrrState, Registers
from mtrremu.core.observer import NULL_OBSERVER, Observer
from mtrremu.core.operations import OPERATIONS
from mtrremu.core.oracle import (
    EXAMPLES,
    Gap,
    StaleLeaf,
    StalenessLog,
    StaleReport,
    find_stale,
    leaf_key_ranges,
    newly_stale,
    stale_keys,
    stale_keys_near,
)
from mtrremu.core.strategy import (
    NO_ZAP,
    MmuLock,
    StrategyFailure,
    VcpuView,
    VmView,
    ZapDecision,
    ZapStrategy,
)
from mtrremu.core.units import (
    EPT_GFN_LIMIT,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MASK,
    ZAP_ALL,
    GfnRange,
    Level,
)
from mtrremu.core.vcpu import Signature, VCpu
from mtrremu.core.zap_engine import ZapEngine
from mtrremu.core.zap_list import Role, ZapList

_PAT = msrs.PAT


@dataclass(frozen=True)
class _EventCheck:
    """An event whose effect on its vCPU's view the oracle checks once its zaps have run."""

    vcpu: VCpu
    #: What the vCPU expected before the event.
    before: IntervalMap
    hook: str
    #: The event, for reports.
    what: str
    #: A variable pair's span before the write (what :attr:`Gap.MOVED_RANGE` excuses).
    old_span: GfnRange | None = None
    #: The event's result: its zap ranges bound what :attr:`Gap.STRADDLING_LEAF` excuses.
    result: EventResult | None = None


#: How much of a failing strategy's error or return value a report quotes.
_QUOTE = 300


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE else text[: _QUOTE - 1] + "…"


def _raised(hook: str, error: Exception) -> StrategyFailure:
    text = f"{type(error).__name__}: {error}"
    return StrategyFailure(hook, "raised " + (text if len(text) <= _QUOTE else text[:_QUOTE] + "…"))


def _leaf(key: int, expected: IntervalMap) -> StaleLeaf:
    gfn, level = key >> 16, Level((key >> 8) & 0xFF)
    want = expected.value_at(gfn)
    return StaleLeaf(
        level,
        gfn << PAGE_SHIFT,
        decode_leaf(key & 0xFF),
        decode_leaf(want) if want else None,
        False,
    )


#: Every this many quiescent oracle checks, scan every leaf (see ``Vm._stale_at_check``).
FULL_SCAN_EVERY = 64
#: Fault plans a VM keeps for its vCPUs to share (each a few KiB).
SHARED_PLANS = 64

#: MMIO markers may always use this many tables, however little memory the VM has.
MMIO_TABLES_MIN = 64


def mmio_table_budget(config: VmConfig) -> int:
    """Tables a VM's EPT may make for MMIO markers: as many 4 KiB tables as its memory could
    need (one per 2 MiB), at least :data:`MMIO_TABLES_MIN`. So markers at most double what the
    server's memory limits already allow for the VM's EPT."""
    return max(MMIO_TABLES_MIN, config.memory_pages // 512)


class Vm:
    """One emulated VM. Create it through the plugin manager, which picks the strategy."""

    def __init__(
        self,
        config: VmConfig,
        strategy: ZapStrategy,
        profile: Profile,
        *,
        vm_id: str = "vm",
        strategy_name: str = "",
        observer: Observer = NULL_OBSERVER,
        known_gaps: frozenset[Gap] = frozenset(),
        event_filter: EventFilter = ALL_EVENTS,
        mmu_lock: MmuLock = MmuLock.WRITE,
    ) -> None:
        self.config = config
        self.strategy = strategy
        # Resolved once: the hot paths call these directly.
        self._on_mtrr_write = strategy.on_mtrr_write
        self._on_cd_toggle = strategy.on_cd_toggle
        self._on_dma_transition = strategy.on_dma_transition
        self._on_host_cd_change: Callable[[VmView, VcpuView], object] | None = getattr(
            strategy, "on_host_cd_change", None
        )
        self._filter = event_filter
        self.profile = profile
        self.vm_id = vm_id
        self.strategy_name = strategy_name
        self._observer = observer
        self.memslots = Memslots(config)
        self.vcpus = tuple(VCpu.create(i, config.guest_maxphyaddr) for i in range(config.vcpus))
        self.mmu_lock = mmu_lock
        self._new_store()
        #: Deleted (:meth:`close`): batches stop, nothing is applied any more.
        self.closed = False
        self.counters = Counters()
        self._dma = config.noncoherent_dma
        self._mmu_lock = threading.Lock()
        self._vm_lock = threading.Lock()
        #: Held through a DMA transition, which runs on no vCPU: taken before any other lock.
        self._dma_lock = threading.Lock()
        self.zap_list = ZapList(self._zap, posted_window=config.zap_list_posted_window)
        self._engine = ZapEngine(self._zap, self._mark, self.zap_list, config.sorted_memslots())
        self._plans: dict[int, tuple[tuple[int, bool, bool], FaultPlan]] = {}
        # A 4-level EPT translates 48 bits: a larger MAXPHYADDR is accepted (its MSR rules
        # matter) but gpas beyond the EPT are refused.
        self._gfn_limit = min(1 << (config.guest_maxphyaddr - PAGE_SHIFT), EPT_GFN_LIMIT)
        self._rules = msrs.write_rules(config.guest_maxphyaddr)
        self.staleness = StalenessLog()
        self.known_gaps = known_gaps
        self._track = config.track_staleness
        #: Quiescent checks so far, and the expected types and stale leaves of the last one.
        self._checks = 0
        self._last_check: tuple[IntervalMap, npt.NDArray[np.int64]] | None = None
        self._stale_memo: (
            tuple[EptStore, int, IntervalMap, IntervalMap, npt.NDArray[np.int64]] | None
        ) = None
        #: Every this many quiescent checks scan every leaf (a cross-check of the others).
        self.full_scan_every = FULL_SCAN_EVERY
        self._dirty = False
        #: With ``track_staleness``: how many vCPUs hold each signature (MTRRs and CR0.CD),
        #: kept up to date as they change, so quiescence is one lookup, not a scan.
        self._signatures: collections.Counter[Signature] = collections.Counter()
        self._signed: list[Signature] = []
        self._count_signatures()
        #: Fault plans by everything they depend on, shared by the vCPUs that agree (a
        #: plan is built once for all of them); bounded, oldest dropped first.
        self._shared_plans: dict[tuple[object, ...], FaultPlan] = {}
        #: Bumped by every event (a read too): whoever keeps a copy knows when it is old.
        self.changes = 0
        self._event_checks: list[_EventCheck] = []
        self._bursting = 0
        self._refresh_view()
        self._handlers: dict[type[Any], Callable[[Any, bool], EventResult]] = {
            kind.type: getattr(self, f"_{kind.name}") for kind in OPERATIONS
        }

    def close(self) -> None:
        """The VM is deleted: free its EPT now (not whenever the cycle collector gets to the
        VM object) and refuse every later operation (:attr:`closed`)."""
        with self._mmu_lock:
            self.closed = True
            self._new_store()
            self._plans.clear()

    @contextmanager
    def idle(self, timeout_s: float = 10.0) -> Iterator[None]:
        """Hold every lock of the VM, at a moment when no burst is under way and the zap list
        is empty: nothing can change and nothing half-done is pending (what a snapshot
        needs). Locks are taken with timeouts and all dropped to retry, so waiting cannot
        deadlock with an operation; raises :class:`FailedPrecondition` if the VM does not
        come to rest within ``timeout_s``."""
        # A DMA transition holds no vCPU lock between its count change and its zaps.
        locks = [self._dma_lock, *(vc.lock for vc in self.vcpus), self._mmu_lock, self._vm_lock]
        deadline = time.monotonic() + timeout_s
        while True:
            held: list[threading.Lock] = []
            try:
                for lock in locks:
                    if not lock.acquire(timeout=0.05):
                        break
                    held.append(lock)
                else:
                    if not self._bursting and not self.zap_list.queued():
                        yield
                        return
            finally:
                for lock in reversed(held):
                    lock.release()
            if time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"VM {self.vm_id} did not come to rest within {timeout_s:g} s"
                )
            time.sleep(0.005)

    def load(
        self, store: EptStore, noncoherent_dma: int, counters: Counters, staleness: StalenessLog
    ) -> None:
        """Take over a restored EPT, DMA count, counters and oracle log (see
        :func:`mtrremu.core.vm_state.restore`, which sets the vCPUs' registers)."""
        with self._mmu_lock, self._vm_lock:
            self._use_store(store)
            self.counters = counters.copy()
            self.staleness = staleness
            self._dma = noncoherent_dma
            self._plans.clear()
            self._shared_plans.clear()
        self._count_signatures()
        self._refresh_view()

    def _count_signatures(self) -> None:
        self._signed = [vc.signature() for vc in self.vcpus]
        self._signatures = collections.Counter(self._signed)

    def _resign(self, vc: VCpu) -> None:
        """``vc``'s MTRRs or CR0.CD changed: move it to its new signature's count."""
        new = vc.signature()
        with self._vm_lock:
            old = self._signed[vc.index]
            if old != new:
                self._signed[vc.index] = new
                self._signatures[old] -= 1
                if not self._signatures[old]:
                    del self._signatures[old]
                self._signatures[new] += 1

    def _new_store(self) -> None:
        """An empty EPT."""
        self._use_store(EptStore(mmio_table_budget=mmio_table_budget(self.config)))

    def _use_store(self, store: EptStore) -> None:
        """Make ``store`` the VM's EPT, zapped the way the strategy's lock mode says."""
        self.store = store
        self._last_check = None
        if self.config.track_staleness:
            store.keep_touched()
        self._store_zap = store.zap_shared if self.mmu_lock is MmuLock.READ else store.zap

    def _refresh_view(self) -> None:
        """The strategy's view and the honoured flag change only with the DMA count."""
        self._view = VmView(
            self.config,
            self.profile,
            self._dma,
            tuple(vc.view for vc in self.vcpus),
            self.memslots,
        )
        self._honours = self.profile.honours_guest_mtrrs and self.config.tdp and self._dma > 0

    # -- state -----------------------------------------------------------------------------

    @property
    def noncoherent_dma(self) -> int:
        return self._dma

    @property
    def honours_guest_mtrrs(self) -> bool:
        """Whether guest MTRRs and CR0.CD decide EPT memory types now
        (docs/semantics.md#vm-configuration)."""
        return self._honours

    def vcpu(self, index: int) -> VCpu:
        if not 0 <= index < len(self.vcpus):
            raise UnknownVcpu(index, len(self.vcpus))
        return self.vcpus[index]

    def view(self) -> VmView:
        """What strategies see of this VM."""
        return self._view

    def counters_snapshot(self) -> Counters:
        with self._vm_lock:
            return self.counters.copy()

    def lookup(self, gpa: int) -> Lookup:
        """The EPT entry for the page holding byte ``gpa``: a leaf, a zapped one, an MMIO marker
        or nothing."""
        gfn = self._gfn_of(gpa)
        with self._mmu_lock:
            entry = self.store.lookup(gfn)
        mapping = (
            Mapping(entry.level, entry.base_gfn << PAGE_SHIFT, entry.memtype)
            if entry.present
            else None
        )
        return Lookup(mapping, entry.zapped, entry.mmio, entry.recalc)

    def leaf_runs(self) -> Iterator[tuple[Level, int, int, int]]:
        """Present leaves as runs (see :meth:`EptStore.leaf_runs`), read one 1 GiB region at a
        time under the MMU lock: memory stays bounded and a slow reader never holds the lock.
        Each region is consistent; operations running meanwhile may show in later regions."""
        with self._mmu_lock:
            regions = self.store.leaf_regions()

        def chunks() -> Iterator[tuple[Any, Any, Any]]:
            for region in regions:
                with self._mmu_lock:
                    chunk = self.store.region_leaves(region)
                yield chunk

        return merge_runs(chunks())

    def _gfn_of(self, gpa: int) -> int:
        """The page of byte ``gpa``, which must lie in the guest-physical space."""
        if not 0 <= gpa < self._gfn_limit << PAGE_SHIFT:
            raise InvalidArgument(
                f"gpa {gpa:#x} is outside the guest-physical space "
                f"(MAXPHYADDR {self.config.guest_maxphyaddr}, a 4-level EPT's 48 bits)"
            )
        return gpa >> PAGE_SHIFT

    # -- internals -------------------------------------------------------------------------

    def _zap(self, rng: GfnRange, counters: Counters) -> None:
        with self._mmu_lock:
            outcome = self._store_zap(rng)
        counters.add_zap(outcome)
        if self._observer.active:
            self._observer.zap_executed(self.vm_id, rng, outcome)

    def _mark(self, rng: GfnRange, counters: Counters) -> None:
        with self._mmu_lock:
            outcome = self.store.mark(rng)
        counters.entries_visited_root += outcome.visited
        counters.recalc_marks += outcome.marked
        counters.tlb_flushes += int(outcome.marked > 0)

    def _resolve(self, vc: VCpu, start: int, end: int, counters: Counters) -> None:
        """An access to ``[start, end)`` by ``vc`` meets re-evaluation marks: resolve them on
        its paths with ``vc``'s view (the caller holds ``vc``'s lock and the MMU lock)."""
        outcome = self.store.resolve(start, end, self.plan(vc).values)
        counters.recalc_pushdowns += outcome.pushdowns
        counters.recalc_leaves += outcome.leaves
        counters.recalc_changed += outcome.changed
        counters.recalc_splits += outcome.splits
        counters.tlb_flushes += int(outcome.changed + outcome.splits > 0)

    def _finish(self, result: EventResult, *, faulted_vcpu: int | None = None) -> EventResult:
        """Account the event, then tell observers (state is consistent by then)."""
        self.changes += 1
        if result.counted:
            with self._vm_lock:
                self.counters.add(result.counters)
        if (self._dirty or self._event_checks) and not self._bursting:
            self.checkpoint()
        elif self._event_checks and not (result.zap is not None and result.zap.pending_drain):
            # In a burst an event whose zaps have all run is checked now: later operations of
            # its round are other vCPUs' doing (their faults may well disagree with it).
            self._check_events(only=result)
        if self._observer.active:
            if faulted_vcpu is not None:
                self._observer.fault(self.vm_id, faulted_vcpu, result)
            self._observer.event_handled(self.vm_id, result)
        return result

    def _decide(self, result: EventResult, decision: object, hook: str, defer_drain: bool) -> None:
        """Anything but :data:`NO_ZAP` goes to the engine and into the result; what is not a
        :class:`ZapDecision` at all is the strategy's failure (:meth:`_fail_safe`)."""
        if type(decision) is not ZapDecision and not isinstance(decision, ZapDecision):
            if not isinstance(decision, StrategyFailure):
                decision = StrategyFailure(hook, f"returned {_brief(decision)}, not a ZapDecision")
            self._fail_safe(result, decision)
        elif decision is not NO_ZAP and decision != NO_ZAP:
            result.zap = self._engine.execute(decision, result.counters, defer_drain=defer_drain)

    def _fail_safe(self, result: EventResult, failure: StrategyFailure) -> None:
        """A strategy call failed: report it and zap everything in its place, so the EPT stays
        consistent with the guest state the event already changed."""
        result.strategy_failure = failure
        result.counters.strategy_failures += 1
        self._zap(ZAP_ALL, result.counters)

    def fault_view(self, vcpu: VCpu) -> FaultView:
        return FaultView(
            self.profile, self.config, self.memslots, self._dma > 0, vcpu.cd, vcpu.mtrr
        )

    def plan(self, vcpu: VCpu) -> FaultPlan:
        """The vectorised fault plan of ``vcpu`` as it is now (cached until its inputs change,
        and shared with the vCPUs whose inputs are the same)."""
        key = (vcpu.mtrr.version, vcpu.cd, self._dma > 0)
        cached = self._plans.get(vcpu.index)
        if cached is None or cached[0] != key:
            cached = (key, self._shared_plan(vcpu, vcpu.mtrr, vcpu.signature()[0]))
            self._plans[vcpu.index] = cached
        return cached[1]

    def _shared_plan(self, vcpu: VCpu, mtrr: MtrrState, registers: Registers) -> FaultPlan:
        """The plan of ``vcpu`` were its MTRRs ``mtrr`` (``registers`` as read back)."""
        inputs = (registers, tuple(mtrr.order), vcpu.cd, self._dma > 0)
        plan = self._shared_plans.get(inputs)
        if plan is None:
            # A plan outlives this vCPU's registers: it reads a copy of them.
            plan = FaultPlan(replace(self.fault_view(vcpu), mtrr=mtrr.copy()))
            if len(self._shared_plans) >= SHARED_PLANS:
                del self._shared_plans[next(iter(self._shared_plans))]
            self._shared_plans[inputs] = plan
        return plan

    def _plan_before_write(self, vcpu: VCpu) -> tuple[FaultPlan, MtrrState]:
        """``vcpu``'s plan as it was before its last MTRR write (which changed its registers),
        and its MTRRs then."""
        old = vcpu.mtrr.before_last_write()
        cached = self._plans.get(vcpu.index)
        if cached is not None and cached[0] == (vcpu.mtrr.version - 1, vcpu.cd, self._dma > 0):
            return cached[1], old
        return self._shared_plan(vcpu, old, old.registers()), old

    # -- MSRs ------------------------------------------------------------------------------

    def write_msr(
        self, vcpu: int, msr: int, value: int, *, host: bool = False, defer_drain: bool = False
    ) -> EventResult:
        """WRMSR (``host=False``) or KVM_SET_MSRS (``host=True``) of one MSR.

        A rejected guest write is a #GP in the result; a rejected host write raises
        :class:`RejectedHostWrite`. Either way nothing changes.
        """
        return self._write_msr(WriteMsr(vcpu, msr, value, host), defer_drain)

    def _write_msr(self, op: WriteMsr, defer_drain: bool) -> EventResult:
        (outcome,) = self.write_msr_run((op,), defer_drain=defer_drain)
        if outcome is None:
            return EventResult(op)
        if isinstance(outcome, MtrremuError):
            raise outcome
        return outcome

    def write_msr_run(
        self,
        ops: Iterable[WriteMsr],
        *,
        defer_drain: bool = False,
        stop: threading.Event | None = None,
    ) -> list[EventResult | MtrremuError | None]:
        """Single-MSR writes in order, each its own event exactly as :meth:`write_msr` runs it
        (this is that method's implementation): per write, ``None`` when its result is bare
        (accepted, nothing counted, zapped or failed: what most writes of a replay are), else
        its :class:`EventResult`, or the error :meth:`write_msr` raises (that write did
        nothing; the run goes on). With ``stop``: ends early, with fewer outcomes, once
        ``stop`` is set or the VM is closed (checked before each write).

        A run exists for speed: one call runs many writes with what they share looked up
        once, and a bare write builds no result (the gRPC front end answers a run of them
        with ready-made pieces, see :class:`mtrremu.rpc.convert.BareResults`)."""
        # Hot: what every write reads is bound once (what may change meanwhile, such as
        # ``_honours`` with the DMA count, is still read per write).
        vcpus, count, checks = self.vcpus, len(self.vcpus), self._rules.checks
        ask, track, event_filter = self._on_mtrr_write, self._track, self._filter
        filtering, observed = event_filter.active, self._observer.active
        stopped = None if stop is None else stop.is_set
        outcomes: list[EventResult | MtrremuError | None] = []
        add = outcomes.append
        for op in ops:
            if stopped is not None and (stopped() or self.closed):
                break
            vcpu, msr, value = op.vcpu, op.msr, op.value
            if not 0 <= vcpu < count:
                add(UnknownVcpu(vcpu, count))
                continue
            if not (0 <= msr <= U64_MASK and 0 <= value <= U64_MASK):
                add(InvalidArgument(f"MSR {msr:#x} or value {value:#x} does not fit in 64 bits"))
                continue
            vc = vcpus[vcpu]
            result: EventResult | None = None
            with vc.lock:
                # A write of the value a register holds needs no check and changes nothing.
                rewrite = msr != _PAT and not filtering and vc.mtrr.rewrite(msr, value)
                if rewrite:
                    why = None
                else:
                    check = checks.get(msr)
                    why = msrs.not_emulated(msr) if check is None else check(value)
                if why is not None:
                    if op.host:
                        add(RejectedHostWrite(msrs.msr_name(msr), value, why))
                        continue
                    result = EventResult(op, gp=f"WRMSR {msrs.msr_name(msr)}: {why}")
                    result.counters.guest_gp += 1
                elif msr == _PAT:
                    vc.pat = value
                else:
                    honours = self._honours
                    dropped = filtering and event_filter.drops(vc.mtrr, vc.cd, msr, value)
                    # A write leaving the registers as they were changes no type: no check.
                    if not rewrite and vc.mtrr.write(msr, value) and track:
                        if honours:
                            result = EventResult(op)
                            self._expect_write(vc, op, result)
                        self._resign(vc)
                        self._dirty = True
                    if honours and dropped:
                        result = EventResult(op) if result is None else result
                        result.counters.events_filtered += 1
                    elif honours:
                        try:
                            decision: object = ask(self._view, vc.view, msr)
                        except Exception as error:  # a plugin's bug: reported, never fatal
                            decision = _raised("on_mtrr_write", error)
                        if decision is not NO_ZAP:  # the usual answer, checked first
                            result = EventResult(op) if result is None else result
                            self._decide(result, decision, "on_mtrr_write", defer_drain)
            if result is None and not observed and not self._dirty:
                self.changes += 1  # what _finish does first (a snapshot may be due)
                add(None)
            else:
                add(self._finish(EventResult(op) if result is None else result))
        return outcomes

    def _expect_write(self, vc: VCpu, op: WriteMsr, result: EventResult) -> None:
        """:meth:`_expect_event` for an MTRR write that changed ``vc``'s registers, after the
        fact (most writes change nothing, and then nothing is looked up)."""
        before, old = self._plan_before_write(vc)
        var = msrs.is_var_msr(op.msr)
        who = "host" if op.host else "guest"
        self._expect_event(
            vc,
            "on_mtrr_write",
            f"{who} write of {op.value:#x} to {msrs.msr_name(op.msr)}",
            old.var_range_gfns(msrs.var_pair(op.msr)[0]) if var else None,
            result,
            before=before.values,
        )

    def _host_cd_change(self, vc: VCpu, what: str, result: EventResult) -> None:
        """A host CR0 write or RESET flipped ``vc``'s CD (called before the change, under its
        lock): only a strategy with ``on_host_cd_change`` is asked, and then checked."""
        if self._on_host_cd_change is None or not self._honours:
            return
        if self._track:
            self._expect_event(vc, "on_host_cd_change", what, result=result)

    def read_msr(self, vcpu: int, msr: int, *, host: bool = False) -> EventResult:
        """RDMSR (an unknown index is a #GP) or KVM_GET_MSRS (an error)."""
        return self._read_msr(ReadMsr(vcpu, msr, host))

    def _read_msr(self, op: ReadMsr, defer_drain: bool = False) -> EventResult:
        vc = self.vcpu(op.vcpu)
        if not 0 <= op.msr <= U64_MASK:
            raise InvalidArgument(f"MSR index {op.msr:#x} does not fit in 64 bits")
        result = EventResult(op)
        why = msrs.read_rejection(op.msr)
        if why is not None:
            if op.host:
                raise InvalidArgument(f"host read of {msrs.msr_name(op.msr)} rejected: {why}")
            result.gp = f"RDMSR {msrs.msr_name(op.msr)}: {why}"
            result.counters.guest_gp += 1
            return self._finish(result)
        with vc.lock:
            result.value = vc.read_msr(op.msr)
        return self._finish(result)

    # -- CR0 -------------------------------------------------------------------------------

    def write_cr0(
        self, vcpu: int, value: int, *, host: bool = False, defer_drain: bool = False
    ) -> EventResult:
        """MOV to CR0 (``host=False``) or KVM_SET_SREGS (``host=True``).

        Only a guest write that flips CD is a memtype event; host writes never zap.
        """
        return self._write_cr0(WriteCr0(vcpu, value, host), defer_drain)

    def _write_cr0(self, op: WriteCr0, defer_drain: bool) -> EventResult:
        vc = self.vcpu(op.vcpu)
        value = op.value
        if not 0 <= value <= U64_MASK:
            raise InvalidArgument(f"CR0 value {value:#x} does not fit in 64 bits")
        result = EventResult(op)
        with vc.lock:
            why = cr0_bits.rejection(value)
            if why is not None:
                if op.host:
                    raise RejectedHostWrite("CR0", value, why)
                result.gp = f"MOV CR0: {why}"
                result.counters.guest_gp += 1
                return self._finish(result)
            old = vc.cr0
            new = value if op.host else cr0_bits.guest_value(value)
            result.cd_toggled = bool((old ^ new) & cr0_bits.CD)
            if result.cd_toggled and not op.host and self._honours and self._track:
                self._expect_event(
                    vc, "on_cd_toggle", f"guest CR0 write of {value:#x}", result=result
                )
            if result.cd_toggled and op.host:
                self._host_cd_change(vc, f"host CR0 write of {value:#x}", result)
            vc.cr0 = result.value = new
            if self._track and result.cd_toggled:
                self._resign(vc)
            self._dirty |= self._track and result.cd_toggled
            if result.cd_toggled and self._honours:
                self._ask_cd(result, vc, op.host, defer_drain)
        return self._finish(result)

    def _ask_cd(self, result: EventResult, vc: VCpu, host: bool, defer_drain: bool) -> None:
        """Ask the strategy about a CD flip that has happened (guest, or host with the hook)."""
        hook = "on_host_cd_change" if host else "on_cd_toggle"
        ask = self._on_host_cd_change if host else self._on_cd_toggle
        if ask is None:
            return
        try:
            decision: object = ask(self._view, vc.view)
        except Exception as error:  # a plugin's bug: reported, never fatal
            decision = _raised(hook, error)
        self._decide(result, decision, hook, defer_drain)

    def reset(self, vcpu: int) -> EventResult:
        """RESET: CR0 back to 0x60000010 (CD=NW=1) without any zap; MTRRs and PAT are left to
        the VMM's reset push, as KVM does."""
        return self._reset_vcpu(Reset(vcpu))

    def _reset_vcpu(self, op: Reset, defer_drain: bool = False) -> EventResult:
        vc = self.vcpu(op.vcpu)
        result = EventResult(op)
        with vc.lock:
            result.cd_toggled = not vc.cd
            if result.cd_toggled:
                self._host_cd_change(vc, "RESET", result)
            vc.cr0 = result.value = cr0_bits.RESET_VALUE
            if self._track and result.cd_toggled:
                self._resign(vc)
            self._dirty |= self._track and result.cd_toggled
            if result.cd_toggled and self._honours:
                self._ask_cd(result, vc, True, defer_drain)
        return self._finish(result)

    def init(self, vcpu: int) -> EventResult:
        """INIT: CR0 to its reset value but CD and NW kept; no zap."""
        return self._init_vcpu(Init(vcpu))

    def _init_vcpu(self, op: Init, defer_drain: bool = False) -> EventResult:
        vc = self.vcpu(op.vcpu)
        result = EventResult(op)
        with vc.lock:
            vc.cr0 = result.value = cr0_bits.init_value(vc.cr0)
        return self._finish(result)

    # -- guest accesses --------------------------------------------------------------------

    def access(self, vcpu: int, gpa: int) -> EventResult:
        """A guest touch of the page holding byte ``gpa``: a hit, a fault that installs a leaf,
        or an MMIO exit."""
        return self._access_gpa(Access(vcpu, gpa))

    def _access_gpa(self, op: Access, defer_drain: bool = False) -> EventResult:
        vc = self.vcpu(op.vcpu)
        gfn = self._gfn_of(op.gpa)
        result = EventResult(op)
        counters = result.counters
        with vc.lock, self._mmu_lock:
            if self.store.marked:
                self._resolve(vc, gfn, gfn + 1, counters)
            entry = self.store.lookup(gfn)
            if entry.present:
                counters.hits += 1
                mapping = Mapping(entry.level, entry.base_gfn << PAGE_SHIFT, entry.memtype)
                result.access = AccessInfo(AccessKind.HIT, mapping)
                return self._finish(result)
            slot = self.memslots.index_of(gfn)
            if slot < 0:
                self.store.mark_mmio(gfn)
                counters.mmio_exits += 1
                result.access = AccessInfo(AccessKind.MMIO)
                return self._finish(result)
            view = self.fault_view(vc)
            level = view.level(gfn)
            base = (gfn >> level.shift) << level.shift
            memtype = view.memtype(base, bool(self.memslots.device[slot]))
            refault = self.store.install(gfn, level, encode_leaf(memtype))
        counters.faults += 1
        counters.refaults += int(refault)
        mapping = Mapping(level, base << PAGE_SHIFT, memtype)
        result.access = AccessInfo(AccessKind.FAULT, mapping, refault)
        return self._finish(result, faulted_vcpu=op.vcpu)

    def fault_range(self, vcpu: int, start_gpa: int, end_gpa: int) -> EventResult:
        """The guest touching every page of ``[start_gpa, end_gpa)`` in order (vectorised; both
        bounds 4 KiB aligned).

        Pages outside every memslot are counted, not touched: no MMIO markers are left.
        """
        return self._fault_range(FaultRange(vcpu, start_gpa, end_gpa))

    def _fault_range(self, op: FaultRange, defer_drain: bool = False) -> EventResult:
        vc = self.vcpu(op.vcpu)
        if (op.start_gpa | op.end_gpa) % PAGE_SIZE:
            raise InvalidArgument(
                f"range [{op.start_gpa:#x}, {op.end_gpa:#x}) is not 4 KiB aligned"
            )
        start, end = op.start_gpa >> PAGE_SHIFT, op.end_gpa >> PAGE_SHIFT
        if not 0 <= start < end <= self._gfn_limit:
            raise InvalidArgument(
                f"range [{op.start_gpa:#x}, {op.end_gpa:#x}) is empty, inverted or beyond "
                f"MAXPHYADDR {self.config.guest_maxphyaddr}"
            )
        result = EventResult(op)
        # The plan is made under the MMU lock, like a single fault's view: a DMA transition
        # changing the types meanwhile is then either seen here or zapped after the install.
        with vc.lock, self._mmu_lock:
            plan = self.plan(vc)
            if self.store.marked:
                self._resolve(vc, start, end, result.counters)
            outcome = self.store.populate(start, end, plan)
        inside = self.memslots.pages_in(start, end)
        result.counters.add_populate(outcome)
        result.counters.hits += inside - outcome.faults
        result.populate = PopulateInfo(outcome, inside - outcome.faults, (end - start) - inside)
        return self._finish(result, faulted_vcpu=op.vcpu if outcome.faults else None)

    # -- non-coherent DMA ------------------------------------------------------------------

    def attach_dma(self) -> EventResult:
        """Attach a non-coherent DMA device; 0→1 is a memtype event (zap all, EPT on)."""
        return self._dma_event(AttachDma(), +1)

    def detach_dma(self) -> EventResult:
        """Detach one; FAILED_PRECONDITION when none is attached."""
        return self._dma_event(DetachDma(), -1)

    def _attach_dma(self, op: AttachDma, defer_drain: bool = False) -> EventResult:
        return self._dma_event(op, +1)

    def _detach_dma(self, op: DetachDma, defer_drain: bool = False) -> EventResult:
        return self._dma_event(op, -1)

    def _dma_event(self, op: AttachDma | DetachDma, delta: int) -> EventResult:
        with self._dma_lock:  # the count change and its zaps, as one (see :meth:`idle`)
            return self._dma_transition(op, delta)

    def _dma_transition(self, op: AttachDma | DetachDma, delta: int) -> EventResult:
        result = EventResult(op)
        with self._vm_lock:
            if self._dma + delta < 0:
                raise FailedPrecondition("no non-coherent DMA device is attached")
            if self._dma + delta > MAX_DMA_DEVICES:
                raise ResourceExhausted(
                    f"the VM already has {MAX_DMA_DEVICES} non-coherent DMA devices attached"
                )
            transition = self._dma + delta == (1 if delta > 0 else 0)
            if transition and self._track and self.config.tdp:
                # Every vCPU's view changes: check one vCPU per distinct MTRR/CD state.
                views = {vc.signature(): vc for vc in self.vcpus}
                what = "non-coherent DMA " + ("attach (0->1)" if delta > 0 else "detach (1->0)")
                for vc in views.values():
                    self._expect_event(vc, "on_dma_transition", what, result=result)
            self._dma += delta
            result.value = self._dma
            self._refresh_view()
            self._dirty |= self._track and transition
        if transition and self.config.tdp:
            result.counters.dma_zap_events += 1
            try:
                decision: object = self._on_dma_transition(self._view, delta > 0)
            except Exception as error:  # a plugin's bug: reported, never fatal
                decision = _raised("on_dma_transition", error)
            if isinstance(decision, ZapDecision):
                # DMA transitions are counted apart from the cover letter's "zap cnt" events.
                decision = replace(decision, zap_event=False)
            self._decide(result, decision, "on_dma_transition", defer_drain=False)
        return self._finish(result)

    # -- several MSRs, whole-vCPU reads, reads of the VM -----------------------------------

    def write_msrs(self, vcpu: int, values: Sequence[MsrValue]) -> EventResult:
        """KVM_SET_MSRS: host writes in order, stopping at the first one KVM refuses. The result
        says how many were written (``value``) and why the next was refused (``rejected``);
        its counters and zaps add up every write's."""
        return self._write_msrs(WriteMsrs(vcpu, tuple(values)))

    def _write_msrs(self, op: WriteMsrs, defer_drain: bool = False) -> EventResult:
        self.vcpu(op.vcpu)
        result = EventResult(op)
        written = 0
        for entry in op.msrs:
            try:
                done = self._write_msr(WriteMsr(op.vcpu, entry.msr, entry.value, True), defer_drain)
            except InvalidArgument as error:
                result.rejected = str(error)
                break
            written += 1
            if done.counted:
                result.counters.add(done.counters)
            result.zap = done.zap if result.zap is None else result.zap.merged(done.zap)
            result.strategy_failure = result.strategy_failure or done.strategy_failure
        result.value = written
        return result

    def read_vcpu_state(self, vcpu: int) -> VcpuState:
        """CR0, PAT and every MTRR MSR of ``vcpu``, read back as a host read."""
        result = self._read_vcpu_state(ReadVcpuState(vcpu))
        assert result.vcpu_state is not None
        return result.vcpu_state

    def _read_vcpu_state(self, op: ReadVcpuState, defer_drain: bool = False) -> EventResult:
        vc = self.vcpu(op.vcpu)
        with vc.lock:
            mtrrs = tuple(MsrValue(msr, vc.read_msr(msr)) for msr in msrs.MTRR_MSRS)
            state = VcpuState(vc.cr0, vc.pat, mtrrs)
        return EventResult(op, vcpu_state=state)

    def _lookup_gpa(self, op: LookupGpa, defer_drain: bool = False) -> EventResult:
        return EventResult(op, lookup=self.lookup(op.gpa))

    def _read_counters(self, op: ReadCounters, defer_drain: bool = False) -> EventResult:
        return EventResult(op, vm_counters=self.counters_snapshot())

    def check_staleness(self, vcpu: int = 0, *, at_quiescence: bool = False) -> StalenessAnswer:
        """The oracle now, relative to ``vcpu``, or to every vCPU at quiescence."""
        result = self._check_staleness(CheckStaleness(vcpu, at_quiescence))
        assert result.staleness is not None
        return result.staleness

    def _check_staleness(self, op: CheckStaleness, defer_drain: bool = False) -> EventResult:
        quiescent = self.quiescent()
        # At quiescence every vCPU agrees: vCPU 0 speaks for them all.
        asked = 0 if op.at_quiescence else op.vcpu
        report = self.stale(asked) if quiescent or not op.at_quiescence else None
        log = replace(self.staleness, excused=dict(self.staleness.excused))
        return EventResult(op, staleness=StalenessAnswer(report, quiescent, log))

    # -- dispatch and bursts ---------------------------------------------------------------

    def apply(self, op: Op, *, defer_drain: bool = False) -> EventResult:
        """Run any operation (``Vm._<name>`` of its row in :mod:`.operations`). ``defer_drain``
        leaves zap-list draining to :meth:`drain_round`."""
        try:
            run = self._handlers[type(op)]
        except KeyError:
            raise InvalidArgument(f"{op!r} is not an operation") from None
        return run(op, defer_drain)

    def drain_round(self, requesters: list[EventResult]) -> None:
        """Finish a burst round: the first requester drains everything queued, the others wait.

        Counts go to each requester's result and to the VM.
        """
        for position, result in enumerate(requesters):
            assert result.zap is not None and result.zap.pending_drain
            delta = Counters()
            if position == 0:
                result.zap.role = self.zap_list.drain_or_wait(delta)
            else:
                delta.waits += 1
                result.zap.role = Role.WAITED
            result.zap.pending_drain = False
            result.counters.add(delta)
            with self._vm_lock:
                self.counters.add(delta)

    # -- the oracle ------------------------------------------------------------------------

    def stale(self, vcpu: int, examples: int = EXAMPLES) -> StaleReport:
        """Stale leaves with respect to ``vcpu`` (docs/oracle.md#stale-leaves), listing up to
        ``examples``."""
        vc = self.vcpu(vcpu)
        with vc.lock:
            expected = self.plan(vc).values
            with self._mmu_lock:
                return find_stale(self.store, expected, vcpu, examples)

    def quiescent(self) -> bool:
        """Every vCPU holds the same MTRRs and CR0.CD (with ``track_staleness``, counted as
        they change; else compared now)."""
        if self._track:
            return len(self._signatures) == 1
        state = self.vcpus[0].signature()
        return all(vc.signature() == state for vc in self.vcpus[1:])

    def _expect_event(
        self,
        vc: VCpu,
        hook: str,
        what: str,
        old_span: GfnRange | None = None,
        result: EventResult | None = None,
        *,
        before: IntervalMap | None = None,
    ) -> None:
        """Remember what ``vc`` expects before an event (``before``, if it already changed;
        else its plan now), to check it after the event's zaps."""
        expected = self.plan(vc).values if before is None else before
        self._event_checks.append(_EventCheck(vc, expected, hook, what, old_span, result))

    def _check_events(self, only: EventResult | None = None) -> None:
        """The oracle after events (see :class:`StalenessLog`): leaves each event left newly
        stale for its vCPU, less what the strategy's declared gaps explain. ``only``: just the
        checks of that event."""
        if only is None:
            checks, self._event_checks = self._event_checks, []
        else:
            checks = [c for c in self._event_checks if c.result is only]
            self._event_checks = [c for c in self._event_checks if c.result is not only]
        log = self.staleness
        for check in checks:
            with check.vcpu.lock:
                after = self.plan(check.vcpu).values
                if check.before is after or check.before.same_as(after):
                    continue
                with self._mmu_lock:
                    keys = self._newly_stale(check.before, after)
            log.event_checks += 1
            if not len(keys):
                continue
            gap, keys = self._excuse(check, keys)
            if gap is not None:
                log.excused[gap.value] = log.excused.get(gap.value, 0) + 1
            if not len(keys):
                continue
            log.stale_events += 1
            log.stale_event_leaves_max = max(log.stale_event_leaves_max, len(keys))
            if not log.first_stale_event:
                log.first_stale_event = (
                    f"{check.what} on vCPU {check.vcpu.index} left {len(keys)} leaves stale "
                    f"for it, e.g. {_leaf(int(keys[0]), after)}"
                )

    def _newly_stale(self, before: IntervalMap, after: IntervalMap) -> npt.NDArray[np.int64]:
        """:func:`newly_stale` of the store, remembered for the last pair of maps with the
        store's generation: vCPUs flipping CD one after another ask the same question of an
        EPT nothing changed in. The maps are the shared fault plans' own objects, so identity
        stands for equality."""
        memo, store = self._stale_memo, self.store
        if (
            memo is not None
            and memo[0] is store
            and memo[1] == store.generation
            and memo[2] is before
            and memo[3] is after
        ):
            return memo[4]
        keys = newly_stale(store, before, after)
        self._stale_memo = (store, store.generation, before, after, keys)
        return keys

    def _excuse(
        self, check: _EventCheck, keys: npt.NDArray[np.int64]
    ) -> tuple[Gap | None, npt.NDArray[np.int64]]:
        """The declared gap that explains some of ``keys``, and the keys it leaves."""
        if check.hook == "on_cd_toggle" and Gap.CD_TOGGLE in self.known_gaps:
            return Gap.CD_TOGGLE, keys[:0]
        span = check.old_span
        if span is not None and Gap.MOVED_RANGE in self.known_gaps:
            gfns, pages = leaf_key_ranges(keys)
            inside = (gfns < span.end) & (gfns + pages > span.start)
            if inside.any():
                return Gap.MOVED_RANGE, keys[~inside]
        zap = None if check.result is None else check.result.zap
        if zap is not None and Gap.STRADDLING_LEAF in self.known_gaps:
            gfns, pages = leaf_key_ranges(keys)
            straddling = np.zeros(len(keys), dtype=bool)
            for rng in zap.requested:
                overlaps = (gfns < rng.end) & (gfns + pages > rng.start)
                straddling |= overlaps & ((gfns < rng.start) | (gfns + pages > rng.end))
            if straddling.any():
                return Gap.STRADDLING_LEAF, keys[~straddling]
        return None, keys

    def checkpoint(self) -> None:
        """With ``track_staleness``: check the events that ran since the last checkpoint, then
        run the oracle if the VM is quiescent (see :class:`StalenessLog`)."""
        if self._event_checks:
            self._check_events()
        if not (self._dirty and self.quiescent()):
            return
        self._dirty = False
        count = len(self._stale_at_check())
        log = self.staleness
        log.checks += 1
        if count:
            log.stale_points += 1
            log.stale_leaves_max = max(log.stale_leaves_max, count)

    def _stale_at_check(self) -> npt.NDArray[np.int64]:
        """The stale leaves at a quiescent point (docs/oracle.md#incremental-checks): looked
        for only where something changed since the last check, i.e. where the expected types
        differ from then, where leaves were installed or re-evaluated, and where the leaves
        stale then lie; anywhere else a leaf is as it was, and was not stale. The first check,
        every :attr:`full_scan_every`-th and any after too many changes to note scan every
        leaf; those that could have been incremental are compared with it (a disagreement is
        a bug in the bookkeeping, raised as such)."""
        vc = self.vcpus[0]
        with vc.lock:
            expected = self.plan(vc).values
            with self._mmu_lock:
                touched = self.store.take_touched()
                self._checks += 1
                last = self._last_check
                near = None
                if last is not None and touched is not None:
                    if not touched and not len(last[1]) and expected.same_as(last[0]):
                        near = last[1]  # nothing was stale then and nothing changed since
                    else:
                        stale_gfns, stale_pages = leaf_key_ranges(last[1])
                        noted = np.array(touched, dtype=np.int64).reshape(-1, 2)
                        spans = [
                            expected.differences(last[0]),
                            (stale_gfns, stale_gfns + stale_pages),
                            (noted[:, 0], noted[:, 1]),
                        ]
                        near = stale_keys_near(self.store, expected, spans)
                keys = near
                if near is None or self._checks % self.full_scan_every == 0:
                    keys = stale_keys(self.store, expected)
                    if near is not None and not np.array_equal(near, keys):
                        raise AssertionError(
                            f"VM {self.vm_id}: the incremental oracle found {len(near)} stale "
                            f"leaves, a full scan {len(keys)} (check {self._checks})"
                        )
        assert keys is not None
        self._last_check = (expected, keys)
        return keys

    def begin_burst(self) -> None:
        """Hold staleness checks until :meth:`end_burst` (rounds check after their drain)."""
        self._bursting += 1

    def end_burst(self) -> None:
        self._bursting -= 1

    def stale_at_quiescence(self) -> StaleReport | None:
        """Stale leaves if the VM is quiescent (then every vCPU agrees), else ``None``."""
        return self.stale(0) if self.quiescent() else None
