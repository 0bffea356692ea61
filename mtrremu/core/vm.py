"""A VM: vCPUs, memslots, one EPT, a zap strategy, and the events that drive them.

Every event runs on the calling thread; one thread per vCPU may drive a VM concurrently. Lock
order: a vCPU's lock, then the MMU lock (EPT), then the VM lock (counters, DMA count); the zap
list has its own lock and never calls out while holding it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from mtrremu.core import cr0 as cr0_bits
from mtrremu.core import msrs
from mtrremu.core.config import MAX_DMA_DEVICES, VmConfig
from mtrremu.core.counters import Counters
from mtrremu.core.ept import Entry, EptStore, encode_leaf
from mtrremu.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RejectedHostWrite,
    ResourceExhausted,
)
from mtrremu.core.events import (
    Access,
    AccessInfo,
    AccessKind,
    AttachDma,
    DetachDma,
    EventResult,
    FaultRange,
    Init,
    Mapping,
    Op,
    PopulateInfo,
    ReadMsr,
    Reset,
    WriteCr0,
    WriteMsr,
)
from mtrremu.core.fault import FaultPlan, FaultView, Memslots
from mtrremu.core.memtype import Profile
from mtrremu.core.observer import NULL_OBSERVER, Observer
from mtrremu.core.oracle import EXAMPLES, StaleReport, find_stale
from mtrremu.core.strategy import NO_ZAP, VmView, ZapDecision, ZapStrategy
from mtrremu.core.units import EPT_GFN_LIMIT, PAGE_SHIFT, U64_MASK, GfnRange, Level
from mtrremu.core.vcpu import VCpu
from mtrremu.core.zap_engine import ZapEngine
from mtrremu.core.zap_list import Role, ZapList

_PAT = msrs.PAT


@dataclass
class StalenessLog:
    """The oracle at quiescent points (``VmConfig.track_staleness``).

    After an event that may change memory types (an accepted MTRR write, a CR0.CD flip, a DMA
    transition), the next time every vCPU holds the same MTRRs and CR0.CD the oracle runs:
    ``checks`` counts those points, ``stale_points`` the ones with stale leaves, and
    ``stale_leaves_max`` the most stale leaves seen at one. A fault never adds a stale leaf, so
    checking only after such changes is exact. Inside a burst the check waits for the round's
    drain.
    """

    checks: int = 0
    stale_points: int = 0
    stale_leaves_max: int = 0


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
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.profile = profile
        self.vm_id = vm_id
        self.strategy_name = strategy_name
        self._observer = observer
        self.memslots = Memslots(config)
        self.vcpus = tuple(VCpu.create(i, config.guest_maxphyaddr) for i in range(config.vcpus))
        self.store = EptStore()
        self.counters = Counters()
        self._dma = config.noncoherent_dma
        self._mmu_lock = threading.Lock()
        self._vm_lock = threading.Lock()
        self.zap_list = ZapList(self._zap, posted_window=config.zap_list_posted_window)
        self._engine = ZapEngine(self._zap, self.zap_list, config.sorted_memslots())
        self._plans: dict[int, tuple[tuple[int, bool, bool], FaultPlan]] = {}
        # A 4-level EPT translates 48 bits: a larger MAXPHYADDR is accepted (its MSR rules
        # matter) but gpas beyond the EPT are refused.
        self._gfn_limit = min(1 << (config.guest_maxphyaddr - PAGE_SHIFT), EPT_GFN_LIMIT)
        self._rules = msrs.write_rules(config.guest_maxphyaddr)
        self.staleness = StalenessLog()
        self._track = config.track_staleness
        self._dirty = False
        self._bursting = 0
        self._refresh_view()

    def _refresh_view(self) -> None:
        """The strategy's view and the honoured flag change only with the DMA count."""
        self._view = VmView(self.config, self.profile, self._dma)
        self._honours = self.profile.honours_guest_mtrrs and self.config.tdp and self._dma > 0

    # -- state -----------------------------------------------------------------------------

    @property
    def noncoherent_dma(self) -> int:
        return self._dma

    @property
    def honours_guest_mtrrs(self) -> bool:
        """Whether guest MTRRs and CR0.CD decide EPT memory types now (semantics.md §2)."""
        return self._honours

    def vcpu(self, index: int) -> VCpu:
        if not 0 <= index < len(self.vcpus):
            raise NotFound(f"vCPU {index} does not exist (the VM has {len(self.vcpus)})")
        return self.vcpus[index]

    def view(self) -> VmView:
        """What strategies see of this VM."""
        return self._view

    def counters_snapshot(self) -> Counters:
        with self._vm_lock:
            return self.counters.copy()

    def lookup(self, gfn: int) -> Entry:
        self._check_gfn(gfn)
        with self._mmu_lock:
            return self.store.lookup(gfn)

    def leaf_runs(self) -> list[tuple[Level, int, int, int]]:
        """Present leaves as runs (see :meth:`EptStore.leaf_runs`), taken under the MMU lock."""
        with self._mmu_lock:
            return list(self.store.leaf_runs())

    def _check_gfn(self, gfn: int) -> None:
        if not 0 <= gfn < self._gfn_limit:
            raise InvalidArgument(
                f"gfn {gfn:#x} is outside the guest-physical space "
                f"(MAXPHYADDR {self.config.guest_maxphyaddr}, a 4-level EPT's 48 bits)"
            )

    # -- internals -------------------------------------------------------------------------

    def _zap(self, rng: GfnRange, counters: Counters) -> None:
        with self._mmu_lock:
            outcome = self.store.zap(rng)
        counters.add_zap(outcome)
        if self._observer.active:
            self._observer.zap_executed(self.vm_id, rng, outcome)

    def _finish(self, result: EventResult, *, faulted_vcpu: int | None = None) -> EventResult:
        """Account the event, then tell observers (state is consistent by then)."""
        if result.counted:
            with self._vm_lock:
                self.counters.add(result.counters)
        if self._dirty and not self._bursting:
            self.checkpoint()
        if self._observer.active:
            if faulted_vcpu is not None:
                self._observer.fault(self.vm_id, faulted_vcpu, result)
            self._observer.event_handled(self.vm_id, result)
        return result

    def _decide(self, result: EventResult, decision: ZapDecision, defer_drain: bool) -> None:
        """Anything but :data:`NO_ZAP` goes to the engine and into the result."""
        if decision is not NO_ZAP and decision != NO_ZAP:
            result.zap = self._engine.execute(decision, result.counters, defer_drain=defer_drain)

    def fault_view(self, vcpu: VCpu) -> FaultView:
        return FaultView(
            self.profile, self.config, self.memslots, self._dma > 0, vcpu.cd, vcpu.mtrr
        )

    def plan(self, vcpu: VCpu) -> FaultPlan:
        """The vectorised fault plan of ``vcpu`` as it is now (cached until its inputs change)."""
        key = (vcpu.mtrr.version, vcpu.cd, self._dma > 0)
        cached = self._plans.get(vcpu.index)
        if cached is None or cached[0] != key:
            cached = (key, FaultPlan(self.fault_view(vcpu)))
            self._plans[vcpu.index] = cached
        return cached[1]

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
        # The high-rate path: kept lean (no helper layers for what one line does).
        vc = self.vcpu(op.vcpu)
        msr, value = op.msr, op.value
        if not (0 <= msr <= U64_MASK and 0 <= value <= U64_MASK):
            raise InvalidArgument(f"MSR {msr:#x} or value {value:#x} does not fit in 64 bits")
        result = EventResult(op)
        with vc.lock:
            why = self._rules.rejection(msr, value)
            if why is not None:
                if op.host:
                    raise RejectedHostWrite(msrs.msr_name(msr), value, why)
                result.gp = f"WRMSR {msrs.msr_name(msr)}: {why}"
                result.counters.guest_gp += 1
                return self._finish(result)
            if msr == _PAT:
                vc.pat = value
            else:
                vc.mtrr.write(msr, value)
                self._dirty = self._track
                if self._honours:
                    decision = self.strategy.on_mtrr_write(self._view, vc.view, msr)
                    self._decide(result, decision, defer_drain)
        if result.own_counters is None and not self._observer.active and not self._dirty:
            return result
        return self._finish(result)

    def read_msr(self, vcpu: int, msr: int, *, host: bool = False) -> EventResult:
        """RDMSR (an unknown index is a #GP) or KVM_GET_MSRS (an error)."""
        return self._read_msr(ReadMsr(vcpu, msr, host))

    def _read_msr(self, op: ReadMsr) -> EventResult:
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
            vc.cr0 = value if op.host else cr0_bits.guest_value(value)
            result.value = vc.cr0
            result.cd_toggled = bool((old ^ vc.cr0) & cr0_bits.CD)
            self._dirty |= self._track and result.cd_toggled
            if result.cd_toggled and not op.host and self._honours:
                decision = self.strategy.on_cd_toggle(self._view, vc.view)
                self._decide(result, decision, defer_drain)
        return self._finish(result)

    def reset(self, vcpu: int) -> EventResult:
        """RESET: CR0 back to 0x60000010 (CD=NW=1) without any zap; MTRRs and PAT are left to
        the VMM's reset push, as KVM does."""
        vc = self.vcpu(vcpu)
        result = EventResult(Reset(vcpu))
        with vc.lock:
            result.cd_toggled = not vc.cd
            vc.cr0 = result.value = cr0_bits.RESET_VALUE
            self._dirty |= self._track and result.cd_toggled
        return self._finish(result)

    def init(self, vcpu: int) -> EventResult:
        """INIT: CR0 to its reset value but CD and NW kept; no zap."""
        vc = self.vcpu(vcpu)
        result = EventResult(Init(vcpu))
        with vc.lock:
            vc.cr0 = result.value = cr0_bits.init_value(vc.cr0)
        return self._finish(result)

    # -- guest accesses --------------------------------------------------------------------

    def access(self, vcpu: int, gfn: int) -> EventResult:
        """A guest touch: a hit, a fault that installs a leaf, or an MMIO exit."""
        return self._access(Access(vcpu, gfn))

    def _access(self, op: Access) -> EventResult:
        vc = self.vcpu(op.vcpu)
        gfn = op.gfn
        self._check_gfn(gfn)
        result = EventResult(op)
        counters = result.counters
        with vc.lock, self._mmu_lock:
            entry = self.store.lookup(gfn)
            if entry.present:
                counters.hits += 1
                mapping = Mapping(entry.level, entry.base_gfn, entry.memtype)
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
        result.access = AccessInfo(AccessKind.FAULT, Mapping(level, base, memtype), refault)
        return self._finish(result, faulted_vcpu=op.vcpu)

    def fault_range(self, vcpu: int, start: int, end: int) -> EventResult:
        """The guest touching every page of gfns ``[start, end)`` in order (vectorised).

        Pages outside every memslot are counted, not touched: no MMIO markers are left.
        """
        return self._fault_range(FaultRange(vcpu, start, end))

    def _fault_range(self, op: FaultRange) -> EventResult:
        vc = self.vcpu(op.vcpu)
        start, end = op.start, op.end
        if not 0 <= start < end <= self._gfn_limit:
            raise InvalidArgument(
                f"gfn range [{start:#x}, {end:#x}) is empty, inverted or beyond MAXPHYADDR "
                f"{self.config.guest_maxphyaddr}"
            )
        result = EventResult(op)
        with vc.lock:
            plan = self.plan(vc)
            with self._mmu_lock:
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

    def _dma_event(self, op: AttachDma | DetachDma, delta: int) -> EventResult:
        result = EventResult(op)
        with self._vm_lock:
            if self._dma + delta < 0:
                raise FailedPrecondition("no non-coherent DMA device is attached")
            if self._dma + delta > MAX_DMA_DEVICES:
                raise ResourceExhausted(
                    f"the VM already has {MAX_DMA_DEVICES} non-coherent DMA devices attached"
                )
            self._dma += delta
            transition = self._dma == (1 if delta > 0 else 0)
            result.value = self._dma
            self._refresh_view()
            self._dirty |= self._track and transition
        if transition and self.config.tdp:
            result.counters.dma_zap_events += 1
            decision = self.strategy.on_dma_transition(self._view, delta > 0)
            # DMA transitions are counted apart from the cover letter's "zap cnt" events.
            self._decide(result, replace(decision, zap_event=False), defer_drain=False)
        return self._finish(result)

    # -- dispatch and bursts ---------------------------------------------------------------

    def apply(self, op: Op, *, defer_drain: bool = False) -> EventResult:
        """Run any operation. ``defer_drain`` leaves zap-list draining to :meth:`drain_round`."""
        if isinstance(op, WriteMsr):  # the hot one first
            return self._write_msr(op, defer_drain)
        if isinstance(op, WriteCr0):
            return self._write_cr0(op, defer_drain)
        if isinstance(op, Access):
            return self._access(op)
        if isinstance(op, FaultRange):
            return self._fault_range(op)
        if isinstance(op, ReadMsr):
            return self._read_msr(op)
        if isinstance(op, Reset):
            return self.reset(op.vcpu)
        if isinstance(op, Init):
            return self.init(op.vcpu)
        if isinstance(op, AttachDma):
            return self.attach_dma()
        return self.detach_dma()

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
        """Stale leaves with respect to ``vcpu`` (semantics.md §9), listing up to ``examples``."""
        vc = self.vcpu(vcpu)
        with vc.lock:
            expected = self.plan(vc).values
            with self._mmu_lock:
                return find_stale(self.store, expected, vcpu, examples)

    def quiescent(self) -> bool:
        """Every vCPU holds the same MTRRs and CR0.CD."""
        state = self.vcpus[0].signature()
        return all(vc.signature() == state for vc in self.vcpus[1:])

    def checkpoint(self) -> None:
        """With ``track_staleness``: run the oracle if the VM is quiescent (see StalenessLog)."""
        if not (self._dirty and self.quiescent()):
            return
        self._dirty = False
        count = self.stale(0, examples=0).count
        log = self.staleness
        log.checks += 1
        if count:
            log.stale_points += 1
            log.stale_leaves_max = max(log.stale_leaves_max, count)

    def begin_burst(self) -> None:
        """Hold staleness checks until :meth:`end_burst` (rounds check after their drain)."""
        self._bursting += 1

    def end_burst(self) -> None:
        self._bursting -= 1

    def stale_at_quiescence(self) -> StaleReport | None:
        """Stale leaves if the VM is quiescent (then every vCPU agrees), else ``None``."""
        return self.stale(0) if self.quiescent() else None
