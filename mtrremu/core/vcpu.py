"""One vCPU's architectural state: CR0, MTRRs and PAT."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mtrremu.core import cr0 as cr0_bits
from mtrremu.core import msrs
from mtrremu.core.mtrr_state import MtrrState, Registers
from mtrremu.core.strategy import VcpuView

#: A vCPU's MTRRs and CR0.CD: equal signatures expect the same memory types.
Signature = tuple[Registers, bool]


@dataclass(eq=False)
class VCpu:
    """State only; the VM applies the rules. ``lock`` serialises calls made on this vCPU (it is
    never taken twice by one thread)."""

    index: int
    mtrr: MtrrState
    cr0: int = cr0_bits.RESET_VALUE
    pat: int = msrs.PAT_DEFAULT
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: What strategies see of this vCPU (a live read-only view).
    view: VcpuView = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = VcpuView(self)
        self._registers: tuple[int, Registers] = (-1, (0, b"", (), ()))

    def signature(self) -> Signature:
        """What quiescence compares: the MTRRs and CR0.CD."""
        if self._registers[0] != self.mtrr.version:
            self._registers = (self.mtrr.version, self.mtrr.registers())
        return self._registers[1], self.cd

    @classmethod
    def create(cls, index: int, maxphyaddr: int) -> VCpu:
        return cls(index, MtrrState(maxphyaddr))

    @property
    def cd(self) -> bool:
        return bool(self.cr0 & cr0_bits.CD)

    def read_msr(self, msr: int) -> int:
        """An emulated MSR's value (the caller has checked the index)."""
        if msr == msrs.MTRRCAP:
            return msrs.MTRRCAP_VALUE
        if msr == msrs.PAT:
            return self.pat
        return self.mtrr.read(msr)
