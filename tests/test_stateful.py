"""Random event sequences against the staleness oracle, through every built-in strategy.

After every event the machine compares, for each vCPU, the stale leaves before and after. New
stale leaves are allowed only where a named cause says, and only there:

* an event on vCPU k that is not a fault leaves nothing newly stale for another vCPU (it changes
  only k's view, and zaps only remove leaves), and a DMA transition nothing for anyone;
* a fault by vCPU k installs leaves typed by k's view: never newly stale for k, and for another
  vCPU only the leaves overlapping the pages it touched;
* for k itself, only the documented causes: a variable range rewritten while E=1 (and, for
  the series, CD=0) is zapped only at its new span, so only leaves overlapping the pair's old
  span; released KVM (kvm-6.5, kvm-6.7) does not zap on a CD toggle with the quirk on; host CR0
  writes and RESET change CD without any zap. kvm-6.11 never honours guest MTRRs: nothing is ever
  excused for it. Nothing is ever excused for the experimental strategies (``precise``,
  ``lazy``) either, in any sequence: they declare no gap. The series' rows with patch 12
  (``*-shared``) may also leave huge leaves straddling a zapped range's edge stale, and only
  those (at quiescence too). ``lazy`` re-evaluates a whole leaf
  table when an access meets a mark, so its faults may leave leaves newly stale for another
  vCPU anywhere in the 2 MiB regions the touched pages lie in.

On top of that, the VM's own after-event oracle must agree: it never reports a stale event for
a built-in strategy (their gaps are declared), and after a final sequence of protocol events
brings every vCPU to the same MTRRs with CD=0, nothing is stale for any strategy.

**The protocol** (machines named ``Protocol_*``): every range-MSR write (guest or host) is made
while the writer has CD=1 or E=0, and there are no host CR0 writes, RESET or INIT. Under it no
cause applies to the series and to kvm-6.11. ``Free_*`` machines (3 vCPUs; 1 vCPU too for the
experimental strategies) drop it.

Examples and steps come from the hypothesis profile (``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mtrremu.core import msrs
from mtrremu.core.errors import FailedPrecondition, RejectedHostWrite
from mtrremu.core.events import EventResult
from mtrremu.core.oracle import leaf_key_ranges
from mtrremu.core.units import GfnRange
from mtrremu.core.vm import Vm
from mtrremu.testing.cases import LEGAL_MTRR_TYPES, MIXED_SLOTS
from tests.helpers import (
    ALL_STRATEGIES,
    CD0,
    CD1,
    EXPERIMENTAL,
    GIB,
    KIB,
    MIB,
    SHARED,
    gfn,
    gpa,
    make_vm,
    var_mask,
)

SLOTS = MIXED_SLOTS
TYPES = st.sampled_from(LEGAL_MTRR_TYPES)
DEFTYPES = st.one_of(
    st.sampled_from([0xC06, 0x806, 0xC00, 0x006, 0x000]),  # what firmware and Linux write
    st.builds(lambda e, fe, t: (e << 11) | (fe << 10) | t, st.booleans(), st.booleans(), TYPES),
    st.sampled_from([0x300, 0xC02, 1 << 12]),  # refused: reserved bits, illegal type
)
FIXED_MSRS = (0x250, 0x258, 0x259, 0x268, 0x26F)
FIXED_VALUES = st.one_of(
    TYPES.map(lambda t: int.from_bytes(bytes([t] * 8), "little")),
    st.lists(TYPES, min_size=8, max_size=8).map(lambda b: int.from_bytes(bytes(b), "little")),
    st.just(0x0202020202020202),
)
BASES = (0, MIB, 2 * MIB, GIB, 2 * GIB, 3 * GIB, 0xE0000000, 4 * GIB, 6 * GIB, 0x1234000)
SIZES = (4 * KIB, MIB, 2 * MIB, 256 * MIB, GIB, 2 * GIB, 4 * GIB, 8 * GIB)
BASE_VALUES = st.one_of(
    st.builds(lambda b, t: b | t, st.sampled_from(BASES), TYPES),
    st.sampled_from([0x100 | 6, 1 << 40]),  # refused
)
MASK_VALUES = st.one_of(
    st.builds(
        lambda s, v: var_mask(s) & ~(0 if v else msrs.PHYSMASK_VALID),
        st.sampled_from(SIZES),
        st.booleans(),
    ),
    st.just(0),
    st.sampled_from([1, 1 << 41]),  # refused
)
RANGE_WRITES = st.one_of(
    st.tuples(st.sampled_from(FIXED_MSRS), FIXED_VALUES),
    st.tuples(st.integers(0, 3).map(lambda p: msrs.PHYSBASE0 + 2 * p), BASE_VALUES),
    st.tuples(st.integers(0, 3).map(lambda p: msrs.PHYSBASE0 + 2 * p + 1), MASK_VALUES),
)
GPAS = (0, 0x9F000, 0xC0000, 0xFF000, MIB, 2 * MIB - 4 * KIB, 2 * MIB, GIB, 2 * GIB - 4 * KIB)
GPAS2 = (0xE0000000, 0xE0200000, 4 * GIB, 5 * GIB, 6 * GIB + 2 * MIB, 8 * GIB - 4 * KIB, 3 * GIB)
GFNS = st.one_of(
    st.sampled_from(GPAS).map(gfn),
    st.sampled_from(GPAS2).map(gfn),
    st.integers(0, gfn(8 * GIB) - 1),
)
LENGTHS = st.sampled_from([1, 300, 512, 2048, gfn(64 * MIB), gfn(2 * GIB)])
CR0_VALUES = st.one_of(st.sampled_from([CD0, CD1]), st.sampled_from([CD0 | (1 << 29), 1 << 32]))
VCPU_INDEX = st.integers(0, 7)


class MemtypeMachine(RuleBasedStateMachine):
    """Drives one VM; subclasses fix the strategy, vCPU count and whether the protocol holds."""

    strategy: ClassVar[str] = "fine-grained"
    vcpus: ClassVar[int] = 1
    protocol: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.vm: Vm = make_vm(self.strategy, vcpus=self.vcpus, memslots=SLOTS, track_staleness=True)
        # Every quiescent check compares the incremental oracle with a full scan (a
        # disagreement raises).
        self.vm.full_scan_every = 1

    # -- bookkeeping -------------------------------------------------------------------

    @property
    def released(self) -> bool:
        return self.strategy in ("kvm-6.5", "kvm-6.7")

    @property
    def gapless(self) -> bool:
        """Declares no gap: nothing is excused, whatever the sequence."""
        return self.strategy in EXPERIMENTAL

    def _stale(self, vcpu: int) -> npt.NDArray[np.int64]:
        return self.vm.stale(vcpu, examples=0).keys

    def _event(
        self,
        actor: int | None,
        excuse: Excuse | None,
        run: Callable[[], object],
        touched: GfnRange | None = None,
    ) -> None:
        """Run one event by ``actor`` (None: the VM, a DMA transition); check that every leaf
        it left newly stale for some vCPU is where ``excuse`` (or ``touched``, for a fault)
        says it may be."""
        views = range(self.vcpus) if actor is None or touched is not None else [actor]
        before = {v: self._stale(v) for v in views}
        run()
        for vcpu in views:
            new = np.setdiff1d(self._stale(vcpu), before[vcpu])
            if not len(new):
                continue
            where = f"{self.strategy}: {len(new)} leaves newly stale for vCPU {vcpu}"
            if touched is not None:
                assert vcpu != actor, f"{where} after its own fault"
                if self.strategy == "lazy":
                    touched = GfnRange(touched.start & ~511, (touched.end + 511) & ~511)
                assert _overlapping(new, touched), f"{where}, outside what vCPU {actor} touched"
                continue
            assert not self.gapless, f"{where}, and {self.strategy} declares no gap"
            if self.strategy in SHARED and _huge_only(new):
                continue  # patch 12 leaves a huge leaf straddling a zapped range's edge
            assert excuse is not None, f"{where}, no cause explains it"
            assert excuse.explains(new), f"{where}, beyond what {excuse.cause} explains"
        assert self.vm.staleness.stale_events == 0, self.vm.staleness.first_stale_event

    def _vcpu(self, index: int) -> int:
        return index % self.vcpus

    def _e_and_cd(self, vcpu: int) -> tuple[bool, bool]:
        vc = self.vm.vcpus[vcpu]
        return vc.mtrr.enabled, vc.cd

    def _range_write_excuse(self, vcpu: int, msr: int) -> Excuse | None:
        enabled, cd = self._e_and_cd(vcpu)
        if self.strategy == "kvm-6.11" or not msrs.is_var_msr(msr) or not enabled:
            return None
        if cd and not self.released:
            return None
        old = self.vm.vcpus[vcpu].mtrr.var_range_gfns(msrs.var_pair(msr)[0])
        return Excuse("a variable range moved while E=1: zapped at its new span", old)

    def _enter_protocol(self, vcpu: int) -> None:
        """Under the protocol a range write needs CD=1 or E=0: set CD first, as firmware does."""
        enabled, cd = self._e_and_cd(vcpu)
        if self.protocol and enabled and not cd:
            self._guest_cr0(vcpu, CD1)

    def _guest_cr0(self, vcpu: int, value: int) -> None:
        excuse = None
        if self.released and self.vm.config.quirk_cd_nw_cleared:
            excuse = Excuse("released KVM does not zap on a CD toggle with the quirk on")
        self._event(vcpu, excuse, lambda: self.vm.write_cr0(vcpu, value))

    def _host_side(self, cause: str) -> Excuse | None:
        return None if self.strategy == "kvm-6.11" else Excuse(cause)

    # -- a plausible starting point --------------------------------------------------------

    @initialize(
        fixed=st.lists(
            FIXED_VALUES.filter(lambda v: v != 0x0202020202020202), min_size=5, max_size=5
        ),
        ranges=st.lists(
            st.tuples(st.sampled_from(BASES), st.sampled_from(SIZES), TYPES), max_size=3
        ),
        deftype=st.sampled_from([0xC06, 0xC06, 0x806, 0xC00, 0x006]),
        cd0=st.lists(st.booleans(), min_size=8, max_size=8),
    )
    def firmware(
        self,
        fixed: list[int],
        ranges: list[tuple[int, int, int]],
        deftype: int,
        cd0: list[bool],
    ) -> None:
        """Firmware-like MTRRs pushed by the host at reset (CD=1), then CD cleared on some
        vCPUs by the guest, and memory touched: all protocol events."""
        for vcpu in range(self.vcpus):
            for msr, value in zip(FIXED_MSRS, fixed, strict=True):
                self.vm.write_msr(vcpu, msr, value, host=True)
            for pair, (base, size, mtype) in enumerate(ranges):
                self.vm.write_msr(vcpu, msrs.PHYSBASE0 + 2 * pair, (base & ~(size - 1)) | mtype)
                self.vm.write_msr(vcpu, msrs.PHYSBASE0 + 2 * pair + 1, var_mask(size))
            self.vm.write_msr(vcpu, msrs.DEFTYPE, deftype, host=True)
            if cd0[vcpu]:
                self.vm.write_cr0(vcpu, CD0)
        for slot in SLOTS:
            self.vm.fault_range(0, gpa(slot.base_gfn), gpa(min(slot.end_gfn, slot.base_gfn + 4096)))

    # -- rules -------------------------------------------------------------------------

    @rule(index=VCPU_INDEX, write=RANGE_WRITES, host=st.booleans())
    def write_range(self, index: int, write: tuple[int, int], host: bool) -> None:
        msr, value = write
        vcpu = self._vcpu(index)
        self._enter_protocol(vcpu)
        self._write_msr(vcpu, msr, value, host, self._range_write_excuse(vcpu, msr))

    def _write_msr(
        self, vcpu: int, msr: int, value: int, host: bool, excuse: Excuse | None
    ) -> None:
        version = self.vm.vcpus[vcpu].mtrr.version

        def run() -> None:
            try:
                result = self.vm.write_msr(vcpu, msr, value, host=host)
            except RejectedHostWrite:
                assert host
                assert self.vm.vcpus[vcpu].mtrr.version == version
                return
            if result.gp is not None:
                assert not host and self.vm.vcpus[vcpu].mtrr.version == version
            assert self.vm.zap_list.queued() == []

        self._event(vcpu, excuse, run)

    @rule(index=VCPU_INDEX, value=DEFTYPES, host=st.booleans())
    def write_deftype(self, index: int, value: int, host: bool) -> None:
        self._write_msr(self._vcpu(index), msrs.DEFTYPE, value, host, None)

    @rule(index=VCPU_INDEX, value=st.sampled_from([msrs.PAT_DEFAULT, 0x0606060606060606]))
    def write_pat(self, index: int, value: int) -> None:
        self._write_msr(self._vcpu(index), msrs.PAT, value, False, None)

    @rule(index=VCPU_INDEX, value=CR0_VALUES)
    def guest_cr0(self, index: int, value: int) -> None:
        self._guest_cr0(self._vcpu(index), value)

    @rule(index=VCPU_INDEX, page=GFNS)
    def access(self, index: int, page: int) -> None:
        vcpu = self._vcpu(index)
        touched = GfnRange(page, page + 1)
        self._event(
            vcpu, None, lambda: self._check_access(self.vm.access(vcpu, gpa(page))), touched
        )

    def _check_access(self, result: EventResult) -> None:
        assert result.access is not None

    @rule(index=VCPU_INDEX, start=GFNS, length=LENGTHS)
    def fault_range(self, index: int, start: int, length: int) -> None:
        end = min(start + length, gfn(1 << 40))
        vcpu = self._vcpu(index)
        touched = GfnRange(start, end)
        self._event(vcpu, None, lambda: self.vm.fault_range(vcpu, gpa(start), gpa(end)), touched)

    @rule(attach=st.booleans())
    def dma(self, attach: bool) -> None:
        def run() -> None:
            if attach:
                self.vm.attach_dma()
                return
            try:
                self.vm.detach_dma()
            except FailedPrecondition:
                assert self.vm.noncoherent_dma == 0

        self._event(None, None, run)

    # -- outside the protocol only -------------------------------------------------------

    @precondition(lambda self: not self.protocol)
    @rule(index=VCPU_INDEX, value=st.sampled_from([CD0, CD1]))
    def host_cr0(self, index: int, value: int) -> None:
        vcpu = self._vcpu(index)
        excuse = self._host_side("host CR0 writes never zap")
        self._event(vcpu, excuse, lambda: self.vm.write_cr0(vcpu, value, host=True))

    @precondition(lambda self: not self.protocol)
    @rule(index=VCPU_INDEX, reset=st.booleans())
    def reset_or_init(self, index: int, reset: bool) -> None:
        vcpu = self._vcpu(index)
        if reset:
            self._event(vcpu, self._host_side("RESET never zaps"), lambda: self.vm.reset(vcpu))
        else:
            self._event(vcpu, None, lambda: self.vm.init(vcpu))

    # -- convergence (several vCPUs under the protocol) -----------------------------------

    @precondition(lambda self: self.vcpus > 1)
    @rule(
        deftype=st.sampled_from([0xC06, 0x806, 0xC00, 0x006]),
        uc_base=st.sampled_from([3 * GIB, 2 * GIB, 0xE0000000]),
        fixed=FIXED_VALUES.filter(lambda v: v != 0x0202020202020202),
    )
    def converge(self, deftype: int, uc_base: int, fixed: int) -> None:
        """Bring every vCPU to the same MTRRs with CD=0 through protocol events only (vCPUs
        come out of RESET through INIT first, as APs do)."""
        final = {msr: 0 for msr in msrs.VAR_MSRS}
        final.update({msr: fixed for msr in msrs.FIXED_MSRS})
        final[msrs.PHYSBASE0] = uc_base
        final[msrs.PHYSBASE0 + 1] = var_mask(256 * MIB)
        final[msrs.PHYSBASE0 + 2] = 6
        final[msrs.PHYSBASE0 + 3] = var_mask(8 * GIB)
        for vcpu in range(self.vcpus):
            self.vm.write_cr0(vcpu, CD1)
            for msr, value in final.items():
                assert self.vm.write_msr(vcpu, msr, value).gp is None
            assert self.vm.write_msr(vcpu, msrs.DEFTYPE, deftype).gp is None
            self.vm.write_cr0(vcpu, CD0)
        assert self.vm.quiescent()
        report = self.vm.stale_at_quiescence()
        assert report is not None
        # Every strategy, released KVM included: the defType writes zap everything under its
        # rules, and the series zaps on the last CD 1->0. Patch 12's zaps leave huge leaves
        # straddling a range's edge: those may stay stale, and nothing else.
        if self.strategy in SHARED:
            assert _huge_only(report.keys), f"stale: {[str(e) for e in report.examples]}"
        else:
            assert report.clean, f"stale at quiescence: {[str(e) for e in report.examples]}"

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def every_usable_leaf_agrees_with_some_vcpu(self) -> None:
        """The experimental strategies' guarantee for other vCPUs' views: a leaf may be wrong
        for some vCPUs while they disagree, never for all of them."""
        if not self.gapless:
            return
        stale_for_all = self._stale(0)
        for vcpu in range(1, self.vcpus):
            stale_for_all = np.intersect1d(stale_for_all, self._stale(vcpu))
        assert not len(stale_for_all), f"{len(stale_for_all)} leaves are stale for every vCPU"

    @invariant()
    def store_accounts_for_its_leaves(self) -> None:
        listed = sum(len(gfns) for _, gfns, _ in self.vm.store.leaves())
        assert listed == self.vm.store.leaf_total
        assert self.vm.zap_list.queued() == []


@dataclass(frozen=True)
class Excuse:
    """A documented cause of stale leaves for the acting vCPU, and where it may leave them."""

    cause: str
    #: The leaves must overlap this range (None: anywhere in the actor's view).
    span: GfnRange | None = None

    def explains(self, keys: npt.NDArray[np.int64]) -> bool:
        return self.span is None or _overlapping(keys, self.span)


def _huge_only(keys: npt.NDArray[np.int64]) -> bool:
    """Whether every leaf of ``keys`` is a huge leaf (2 MiB or 1 GiB)."""
    _, pages = leaf_key_ranges(keys)
    return bool((pages > 1).all())


def _overlapping(keys: npt.NDArray[np.int64], span: GfnRange) -> bool:
    """Whether every leaf of ``keys`` overlaps ``span``."""
    gfns, pages = leaf_key_ranges(keys)
    return bool(((gfns < span.end) & (gfns + pages > span.start)).all())


def _machine(strategy: str, vcpus: int, protocol: bool) -> type[MemtypeMachine]:
    mode = "Protocol" if protocol else "Free"
    name = f"{mode}_{strategy.replace('-', '_').replace('.', '')}_{vcpus}"
    return type(
        name, (MemtypeMachine,), {"strategy": strategy, "vcpus": vcpus, "protocol": protocol}
    )


# Per strategy: the protocol with one vCPU and with three, and three vCPUs without it; for the
# experimental strategies also any single-vCPU sequence.
_globals = globals()
for _strategy in ALL_STRATEGIES:
    _shapes: tuple[tuple[int, bool], ...] = ((1, True), (3, True), (3, False))
    if _strategy in EXPERIMENTAL:
        _shapes += ((1, False),)
    for _vcpus, _protocol in _shapes:
        _m = _machine(_strategy, _vcpus, _protocol)
        _globals[f"Test{_m.__name__}"] = _m.TestCase
