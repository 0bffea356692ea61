"""The emulator core: plain typed Python and numpy, no RPC and no plugin machinery.

Where things live:

* MSR indices and validity — :mod:`.msrs`; CR0 rules — :mod:`.cr0`
* one vCPU's MTRR registers and KVM's walk over them — :mod:`.mtrr_state`
* the memory type of a page, the huge-page test and the per-profile EPT type — :mod:`.memtype`
* the level and type a fault installs (scalar and vectorised) — :mod:`.fault`
* the EPT tables — :mod:`.ept`; zap list — :mod:`.zap_list`; running decisions — :mod:`.zap_engine`
* what strategies see and decide — :mod:`.strategy`; the VM — :mod:`.vm`; bursts — :mod:`.burst`
* staleness — :mod:`.oracle`; counters — :mod:`.counters`
"""

from mtrremu.core.burst import execute, run_burst
from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.counters import Counters
from mtrremu.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidConfig,
    MtrremuError,
    NotFound,
    PluginConflict,
    RejectedHostWrite,
    ResourceExhausted,
    UnknownStrategy,
)
from mtrremu.core.events import (
    Access,
    AccessKind,
    AttachDma,
    Burst,
    BurstResult,
    DetachDma,
    EventResult,
    FaultRange,
    Init,
    Item,
    ItemResult,
    Op,
    ReadMsr,
    Refused,
    Reset,
    WriteCr0,
    WriteMsr,
)
from mtrremu.core.memtype import EptMemtype, Precedence, Profile
from mtrremu.core.memtypes import MemType
from mtrremu.core.oracle import StaleReport
from mtrremu.core.strategy import (
    NO_ZAP,
    AllocFailure,
    Route,
    VcpuView,
    VmView,
    ZapDecision,
    ZapStrategy,
    kvm_mtrr_write_range,
)
from mtrremu.core.units import ZAP_ALL, GfnRange, Level
from mtrremu.core.vm import Vm

__all__ = [
    "NO_ZAP",
    "ZAP_ALL",
    "Access",
    "AccessKind",
    "AllocFailure",
    "AttachDma",
    "Burst",
    "BurstResult",
    "Counters",
    "DetachDma",
    "EptMemtype",
    "EventResult",
    "FailedPrecondition",
    "FaultRange",
    "GfnRange",
    "Init",
    "InvalidArgument",
    "InvalidConfig",
    "Item",
    "ItemResult",
    "Level",
    "MemType",
    "Memslot",
    "MemslotKind",
    "MtrremuError",
    "NotFound",
    "Op",
    "PluginConflict",
    "Precedence",
    "Profile",
    "ReadMsr",
    "Refused",
    "RejectedHostWrite",
    "ResourceExhausted",
    "Reset",
    "Route",
    "StaleReport",
    "UnknownStrategy",
    "VcpuView",
    "Vm",
    "VmConfig",
    "VmView",
    "WriteCr0",
    "WriteMsr",
    "ZapDecision",
    "ZapStrategy",
    "execute",
    "kvm_mtrr_write_range",
    "run_burst",
]
