"""The workloads against the series' published numbers and the orderings its rows imply.

W1 (SeaBIOS) and W2 (OVMF) with 8 vCPUs and 16 GiB must reproduce the cover letter's zap
counts — 50/42 and 84/74 under the Base1/Base2 rules — because the traces follow the firmware,
and the counted work must order the rows as the published cycles do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from mtrremu.ab.runner import RunSpec, run
from mtrremu.core.burst import execute
from mtrremu.core.counters import Counters
from mtrremu.core.events import Burst, WriteCr0
from mtrremu.core.vm import Vm
from mtrremu.workloads import WORKLOADS, build
from mtrremu.workloads.trace import Trace
from tests.helpers import SERIES, create_vm, serving


def replay(trace: Trace, strategy: str) -> tuple[Counters, Vm]:
    vm = create_vm(dataclasses.replace(trace.config, track_staleness=True), strategy)
    execute(vm, trace.items)
    return vm.counters_snapshot(), vm


@pytest.mark.parametrize(
    ("workload", "base1", "base2"), [("W1", 50, 42), ("W2", 84, 74)], ids=["SeaBIOS", "OVMF"]
)
def test_the_published_zap_counts(workload: str, base1: int, base2: int) -> None:
    trace = build(workload)  # defaults: 8 vCPUs, 16 GiB
    assert replay(trace, "kvm-6.5")[0].zap_events == base1
    for strategy in SERIES:
        assert replay(trace, strategy)[0].zap_events == base2, strategy


@pytest.mark.parametrize("vcpus", [1, 2, 4, 16])
def test_the_zap_counts_follow_the_docstring_formulas(vcpus: int) -> None:
    n = vcpus
    w1 = build("W1", {"vcpus": n, "ram": 4 << 30})
    assert replay(w1, "kvm-6.5")[0].zap_events == 6 * n + 2
    assert replay(w1, "zap-all")[0].zap_events == 5 * n + 2
    w2 = build("W2", {"vcpus": n, "ram": 4 << 30})
    assert replay(w2, "kvm-6.5")[0].zap_events == 10 * n + 4
    assert replay(w2, "zap-all")[0].zap_events == 9 * n + 2


@pytest.mark.parametrize(
    ("overrides", "base1", "base2"),
    [
        ({"vcpus": 2}, 8, 8),  # linux protocol: defType pushes vs CD flips at Linux's entry
        ({"vcpus": 2, "boot_protocol": "pvh"}, 8, 6),
        ({"vcpus": 2, "boot_protocol": "pvh", "msrs_first": False}, 8, 8),
        ({"vcpus": 3, "vmm": "crosvm"}, 11, 11),
    ],
)
def test_w3_zap_counts(overrides: dict[str, object], base1: int, base2: int) -> None:
    trace = build("W3", overrides)
    assert replay(trace, "kvm-6.5")[0].zap_events == base1
    assert replay(trace, "zap-all")[0].zap_events == base2


def test_w4_w5_w6_zap_counts() -> None:
    n = 6
    w4 = build("W4", {"vcpus": n, "ram": 64 << 30, "max_mapping_level": "1G"})
    assert (replay(w4, "kvm-6.5")[0].zap_events, replay(w4, "zap-all")[0].zap_events) == (
        3 * n,
        2 * n,
    )
    w5 = build("W5", {"vcpus": n, "ram": 8 << 30})
    assert (replay(w5, "kvm-6.5")[0].zap_events, replay(w5, "zap-all")[0].zap_events) == (
        5 * n,
        4 * n,
    )
    for variant in ("kvm", "cd0"):
        w6 = build("W6", {"vcpus": n, "variant": variant})
        linux = 2 + 2 * n
        assert replay(w6, "kvm-6.5")[0].zap_events == n + linux
        assert replay(w6, "zap-all")[0].zap_events == n + linux  # kvm: 1 + (n-1) CD flips


@pytest.mark.parametrize("workload", ["W1", "W2"])
def test_counted_work_orders_the_rows_as_the_published_cycles(workload: str) -> None:
    trace = build(workload)
    rows = [replay(trace, strategy)[0] for strategy in SERIES]
    for metric in ("leaves_removed", "entries_visited", "refaults"):
        values = [getattr(c, metric) for c in rows]
        assert values == sorted(values, reverse=True), (metric, values)
    assert rows[0].entries_visited > rows[3].entries_visited


@pytest.mark.parametrize(("workload", "bursts"), [("W1", 1), ("W2", 5)])
def test_serialised_zapping_deduplicates_in_the_bursts(workload: str, bursts: int) -> None:
    trace = build(workload)
    assert sum(isinstance(item, Burst) for item in trace.items) == bursts
    zap_all, serialised = replay(trace, "zap-all")[0], replay(trace, "zap-all-serialized")[0]
    assert serialised.duplicates_dropped > 0
    assert serialised.zaps_executed < zap_all.zaps_executed
    assert zap_all.duplicates_dropped == 0


def test_w1s_ap_cd_clear_burst_is_where_its_duplicates_come_from() -> None:
    trace = build("W1")
    (burst,) = [item for item in trace.items if isinstance(item, Burst)]
    clearing = [vcpu for vcpu, ops in burst.lanes if any(isinstance(op, WriteCr0) for op in ops)]
    # Every AP clears CD in it; the BSP, spinning for SMPLock, only touches memory.
    assert sorted(clearing) == list(range(1, 8))
    assert {vcpu for vcpu, _ in burst.lanes} == set(range(8))
    assert replay(trace, "zap-all-serialized")[0].duplicates_dropped == len(clearing) - 1


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_every_workload_ends_quiescent_and_clean_under_the_series(workload: str) -> None:
    small = {"vcpus": 4, "ram": 8 << 30} if workload != "W4" else {"vcpus": 4, "ram": 64 << 30}
    trace = build(workload, small)
    for strategy in SERIES:
        counters, vm = replay(trace, strategy)
        report = vm.stale_at_quiescence()
        assert report is not None and report.clean, (strategy, report)
        assert vm.staleness.stale_points == 0
        assert counters.faults > 0


def test_the_same_seed_gives_the_same_trace_and_counts() -> None:
    first, second = build("W2", seed=7), build("W2", seed=7)
    assert first.items == second.items
    other = build("W2", seed=8)
    assert [b.seed for b in first.items if isinstance(b, Burst)] != [
        b.seed for b in other.items if isinstance(b, Burst)
    ]
    assert replay(first, "fine-grained")[0] == replay(second, "fine-grained")[0]


# -- the default job over gRPC ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving() as running:
        (address,) = running.addresses
        yield address


@pytest.mark.parametrize("workload", ["W1", "W2"])
@pytest.mark.parametrize("strategy", ["kvm-6.5", *SERIES])
def test_the_default_job_counts_the_same_in_process_and_over_grpc(
    server: str, workload: str, strategy: str
) -> None:
    local = run(RunSpec(workload, strategy))
    remote = run(RunSpec(workload, strategy, target=server))
    assert remote["mode"] == "grpc" and local["mode"] == "in-process"
    assert remote["counters"] == local["counters"]
    assert remote["staleness"] == local["staleness"]
    assert local["published"]["zap_count"] == local["counters"]["zap_events"]
