"""Real threads, one per vCPU, meeting in patch 9's zap list (docs/semantics.md#the-zap-list)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mtrremu.core import msrs
from mtrremu.core.events import EventResult
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import ZAP_ALL
from mtrremu.core.zap_list import Role
from tests.helpers import (
    CD0,
    CD1,
    GIB,
    gpa,
    make_vm,
    programmed,
    run_threads,
    set_deftype,
    set_var,
)

VCPUS = 8
TIMEOUT = 30.0
ROUNDS = 41  # odd: every vCPU ends with CD=0


@pytest.fixture(autouse=True)
def _switch_often() -> Iterator[None]:
    """Make the interpreter switch threads often so interleavings actually happen."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.0005)


@pytest.mark.parametrize("strategy", ["zap-all-serialized", "fine-grained", "fine-grained-split"])
def test_toggling_vcpus_never_return_while_their_range_is_queued(strategy: str) -> None:
    vm = programmed(strategy, VCPUS, MemType.UC)
    start = threading.Barrier(VCPUS)
    early: list[str] = []

    def vcpu_thread(index: int) -> None:
        start.wait(TIMEOUT)
        for round_ in range(ROUNDS):
            result = vm.write_cr0(index, CD1 if round_ % 2 else CD0)
            assert result.zap is not None and result.zap.role in (Role.DRAINED, Role.WAITED)
            for ticket in result.zap.tickets:
                if not ticket.drained:
                    early.append(f"vCPU {index} returned with {ticket.range} queued")
            vm.access(index, 3 * GIB + gpa(round_))

    run_threads(VCPUS, vcpu_thread, TIMEOUT)
    assert early == []
    counters = vm.counters
    assert counters.zap_events == VCPUS * ROUNDS
    assert counters.drains + counters.waits == VCPUS * ROUNDS
    assert vm.zap_list.queued() == []
    # Every vCPU ended at CD=0 with the same MTRRs: nothing may be stale.
    assert vm.quiescent()
    stale = vm.stale_at_quiescence()
    assert stale is not None and stale.count == 0


def test_held_drainer_makes_every_other_request_a_duplicate() -> None:
    vm = make_vm("zap-all-serialized", vcpus=VCPUS)
    vm.fault_range(0, 0, GIB)
    start = threading.Barrier(VCPUS)
    held = threading.Event()

    def hold_first_drainer() -> None:
        held.set()
        wait_until(lambda: vm.zap_list.waiting == VCPUS - 1)

    vm.zap_list.hooks.drain_started = hold_first_drainer
    results: dict[int, EventResult] = {}

    def vcpu_thread(index: int) -> None:
        start.wait(TIMEOUT)
        results[index] = vm.write_cr0(index, CD0)

    run_threads(VCPUS, vcpu_thread, TIMEOUT)
    assert held.is_set()
    roles = sorted(r.zap.role.value for r in results.values() if r.zap and r.zap.role)
    assert roles == ["drained"] + ["waited"] * (VCPUS - 1)
    counters = vm.counters
    assert (counters.zap_events, counters.ranges_queued, counters.duplicates_dropped) == (
        VCPUS,
        1,
        VCPUS - 1,
    )
    assert (counters.drains, counters.waits, counters.zaps_executed) == (1, VCPUS - 1, 1)
    assert vm.store.leaf_total == 0


def test_posted_window_lets_a_requester_return_with_its_range_queued() -> None:
    vm = make_vm("zap-all-serialized", vcpus=2, zap_list_posted_window=True)
    for vcpu in range(2):
        vm.write_cr0(vcpu, CD0, host=True)
        set_deftype(vm, vcpu, 0xC06)
    set_var(vm, 1, 0, 3 * GIB, GIB, MemType.WB)  # the pair vCPU 1 will retype to UC
    late: dict[str, EventResult] = {}
    late_threads: list[threading.Thread] = []

    def in_the_window() -> None:
        # vCPU 0 saw the list empty and has not cleared the flag yet. vCPU 1 faults a WB
        # leaf, then retypes its range to UC: the zap is queued and vCPU 1 waits.
        vm.access(1, 3 * GIB)
        requester = threading.Thread(
            target=lambda: late.setdefault(
                "result", vm.write_msr(1, msrs.PHYSBASE0, 3 * GIB | MemType.UC)
            )
        )
        late_threads.append(requester)
        requester.start()
        wait_until(lambda: vm.zap_list.waiting == 1)

    vm.zap_list.hooks.before_flag_clear = in_the_window
    first = vm.write_cr0(0, CD1)  # vCPU 0 drains its zap-all
    vm.zap_list.hooks.before_flag_clear = lambda: None
    late_threads[0].join(TIMEOUT)
    assert first.zap is not None and first.zap.role is Role.DRAINED
    result = late["result"]
    assert result.zap is not None and result.zap.role is Role.WAITED
    (ticket,) = result.zap.tickets
    assert not ticket.drained
    assert vm.zap_list.queued() == [ticket.range]
    # The early return is visible to the oracle: vCPU 1's new UC range still holds a WB leaf.
    stale = vm.stale(1)
    assert stale.count == 1 and stale.examples[0].base_gpa == 3 * GIB


def test_default_protocol_drains_ranges_queued_while_draining() -> None:
    vm = make_vm("zap-all-serialized", vcpus=2)
    for vcpu in range(2):
        vm.write_cr0(vcpu, CD0, host=True)
        set_deftype(vm, vcpu, 0xC06)
    late: dict[str, EventResult] = {}
    started = threading.Event()

    def while_draining() -> None:
        if started.is_set():
            return
        started.set()
        requester = threading.Thread(
            target=lambda: late.setdefault("result", vm.write_msr(1, msrs.DEFTYPE, 0xC00))
        )
        requester.start()
        wait_until(lambda: vm.zap_list.waiting == 1)
        threads.append(requester)

    threads: list[threading.Thread] = []
    vm.zap_list.hooks.drain_started = while_draining
    first = vm.write_cr0(0, CD1)
    threads[0].join(TIMEOUT)
    result = late["result"]
    assert result.zap is not None and result.zap.role is Role.WAITED
    assert all(t.drained for t in result.zap.tickets)
    assert vm.zap_list.queued() == []
    assert first.counters.zaps_executed == 1  # the duplicate ZAP_ALL was dropped
    assert result.zap.tickets[0].range == ZAP_ALL
