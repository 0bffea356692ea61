"""One vCPU's architectural state: CR0, MTRRs and PAT."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mtrremu.core import cr0 as cr0_bits
from mtrremu.core import msrs
from mtrremu.core.mtrr_state import MtrrState
from mtrremu.core.strategy import MtrrView, VcpuView


@dataclass(eq=False)
class VCpu:
    """State only; the VM applies the rules. ``lock`` serialises calls made on this vCPU."""

    index: int
    mtrr: MtrrState
    cr0: int = cr0_bits.RESET_VALUE
    pat: int = msrs.PAT_DEFAULT
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def create(cls, index: int, maxphyaddr: int) -> VCpu:
        return cls(index, MtrrState(maxphyaddr))

    @property
    def cd(self) -> bool:
        return bool(self.cr0 & cr0_bits.CD)

    def view(self) -> VcpuView:
        return VcpuView(self.index, self.cr0, MtrrView(self.mtrr))

    def read_msr(self, msr: int) -> int:
        """An emulated MSR's value (the caller has checked the index)."""
        if msr == msrs.MTRRCAP:
            return msrs.MTRRCAP_VALUE
        if msr == msrs.PAT:
            return self.pat
        return self.mtrr.read(msr)
