"""What the series' cover letter published, to print next to our counts
(docs/semantics.md#published-figures).

"KVM: x86/mmu: refine memtype related mmu zap" v4, 16 GiB guest with a passthrough device,
8 vCPUs, 3.1 GHz host, booting OVMF or SeaBIOS into Linux.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrremu.core.units import GIB

#: The cover letter's rows, and the strategy each one is.
ROWS = {
    "kvm-6.5": "Base1",
    "zap-all": "Base2",
    "zap-all-serialized": "Base2 + patch 9",
    "fine-grained": "Base2 + patches 9+10",
    "fine-grained-split": "Base2 + patches 9+10+11",
    "fine-grained-split-shared": "Base2 + patches 9+10+11+12",
    "zap-all-shared": "Base2 + patch 12",
    "fine-grained-shared": "Base2 + patches 9+10+12",
}

#: Workload → (firmware, zap events per rule set).
ZAP_COUNTS = {
    "W2": ("OVMF", {"Base1": 84, "Base2": 74}),
    "W1": ("SeaBIOS", {"Base1": 50, "Base2": 42}),
}

#: Millions of CPU cycles spent zapping, per row.
CYCLES_M = {
    "W2": {
        "kvm-6.5": 3506.37,
        "zap-all": 4241.46,
        "zap-all-serialized": 319.23,
        "fine-grained": 128.34,
        "fine-grained-split": 37.17,
        "fine-grained-split-shared": 17.21,
        "zap-all-shared": 32.66,
        "fine-grained-shared": 15.01,
    },
    "W1": {
        "kvm-6.5": 44.55,
        "zap-all": 526.65,
        "zap-all-serialized": 116.59,
        "fine-grained": 62.09,
        "fine-grained-split": 17.86,
        "fine-grained-split-shared": 16.98,
        "zap-all-shared": 24.65,
        "fine-grained-shared": 18.44,
    },
}

#: What the timing model (docs/timing.md) leaves out, printed under the published table.
NOT_MODELLED = (
    "Six costs fitted once on these 16 rows; every other number is a prediction.",
    "Only zap calls are timed: faults, vCPUs' own page-table walks and cache effects are not, "
    "and faulting vCPUs never contend for the MMU lock.",
    "Concurrency exists only inside bursts (lock-step rounds); events outside them run alone.",
    "Patch 11's published gain (3.5x) is larger than the counted work explains: the model "
    "over-predicts the split rows (ln error up to +0.64).",
)


@dataclass(frozen=True)
class Published:
    """The published numbers that apply to one run, if any."""

    firmware: str
    zap_count: int
    cycles_m: float | None


def published(workload: str, strategy: str, vcpus: int, memory_bytes: int) -> Published | None:
    """The cover letter's numbers for this run, when it is one of the published setups."""
    if workload not in ZAP_COUNTS or strategy not in ROWS:
        return None
    if vcpus != 8 or memory_bytes != 16 * GIB:
        return None
    firmware, counts = ZAP_COUNTS[workload]
    rule = ROWS[strategy].split()[0]  # the zap events follow the row's base rule set
    return Published(firmware, counts[rule], CYCLES_M[workload].get(strategy))
