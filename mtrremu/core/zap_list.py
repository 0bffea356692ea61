"""Patch 9's serialised zap list: a VM-wide queue of ranges and one vCPU draining it at a time.

Ranges are kept length-ascending, then start-descending; a range identical to a queued one is
dropped (contained or overlapping ones are not). The first vCPU to claim the "zapping" flag
drains the list smallest-first, zapping each range outside the list lock; the others wait for
the flag to clear.

The posted patch cleared the flag after releasing the list lock, so a vCPU that queued in that
window could see the flag still set, wait, and return with its range still queued. By default
the drainer checks for an empty list and clears the flag under one lock hold; with
``posted_window=True`` the posted behaviour is reproduced (and :class:`ZapListHooks` can pause
the drainer inside the window to show it deterministically).

Thread-safe: one thread per vCPU may call :meth:`ZapList.request` concurrently.
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mtrremu.core.counters import Counters
from mtrremu.core.units import GfnRange


@dataclass(eq=False)
class Ticket:
    """One queued range. ``drained`` turns true once a drainer has zapped it."""

    range: GfnRange
    drained: bool = False
    discarded: bool = False


def _list_key(rng: GfnRange) -> tuple[int, int]:
    """Where KVM's list puts a range: shorter first, then higher start first."""
    return rng.list_length(), -rng.start


class Role(enum.Enum):
    """What a vCPU did in :meth:`ZapList.drain_or_wait`."""

    DRAINED = "drained"
    WAITED = "waited"


@dataclass
class ZapListHooks:
    """Test points inside the protocol (each runs on the drainer's thread, lock not held)."""

    #: After a vCPU claimed the flag, before it looks at the list.
    drain_started: Callable[[], None] = field(default=lambda: None)
    #: Posted window only: after the drainer saw the list empty, before it clears the flag.
    before_flag_clear: Callable[[], None] = field(default=lambda: None)


class ZapList:
    """The VM-wide list. ``zap`` executes one range on the EPT and counts it."""

    def __init__(
        self,
        zap: Callable[[GfnRange, Counters], None],
        *,
        posted_window: bool = False,
        hooks: ZapListHooks | None = None,
    ) -> None:
        self._zap = zap
        self.posted_window = posted_window
        self.hooks = hooks or ZapListHooks()
        self._lock = threading.Lock()
        self._flag_cleared = threading.Condition(self._lock)
        # The queue in drain order and an index of its ranges: adding is a dict lookup and a
        # bisection, so bursts with many ranges stay cheap.
        self._queue: list[Ticket] = []
        self._index: dict[GfnRange, Ticket] = {}
        self._zapping = False
        self._waiting = 0
        self._fail_after: int | None = None
        self._fail_count = 0

    # -- allocation failure injection ------------------------------------------------------

    def fail_allocations(self, count: int = 1, after: int = 0) -> None:
        """Make ``count`` queue allocations fail once ``after`` more have succeeded."""
        with self._lock:
            self._fail_after, self._fail_count = after, count

    def allocate(self) -> bool:
        """One queue-entry allocation: False if an injected failure is due (KVM's kmalloc)."""
        with self._lock:
            if self._fail_after is None:
                return True
            if self._fail_after > 0:
                self._fail_after -= 1
                return True
            self._fail_count -= 1
            if self._fail_count <= 0:
                self._fail_after = None
            return False

    # -- the protocol ----------------------------------------------------------------------

    def queued(self) -> list[GfnRange]:
        """The ranges waiting, in drain order."""
        with self._lock:
            return [t.range for t in self._queue]

    def add(self, rng: GfnRange, counters: Counters) -> Ticket:
        """Queue ``rng`` in order, or return the identical ticket already queued."""
        with self._lock:
            queued = self._index.get(rng)
            if queued is not None:
                counters.duplicates_dropped += 1
                return queued
            # The new range goes before the first one of a larger key, as KVM's list walk puts it.
            at = bisect.bisect_left(self._queue, _list_key(rng), key=lambda t: _list_key(t.range))
            ticket = Ticket(rng)
            self._queue.insert(at, ticket)
            self._index[rng] = ticket
            counters.ranges_queued += 1
            return ticket

    def _pop_first(self) -> Ticket:
        ticket = self._queue.pop(0)
        del self._index[ticket.range]
        return ticket

    def clear(self) -> int:
        """Drop every queued range (patch 10's allocation-failure path); returns how many."""
        with self._lock:
            dropped = self._queue
            self._queue, self._index = [], {}
        for ticket in dropped:
            ticket.discarded = True
        return len(dropped)

    def try_claim(self) -> bool:
        """Claim the zapping flag if it is free."""
        with self._lock:
            if self._zapping:
                return False
            self._zapping = True
            return True

    def drain(self, counters: Counters) -> None:
        """Zap queued ranges smallest-first until the list is empty, then clear the flag.

        The caller must hold the flag (:meth:`try_claim`).
        """
        counters.drains += 1
        self.hooks.drain_started()
        while True:
            with self._lock:
                if not self._queue:
                    if not self.posted_window:
                        self._zapping = False
                        self._flag_cleared.notify_all()
                        return
                    break
                ticket = self._pop_first()
            self._zap(ticket.range, counters)
            ticket.drained = True
        self.hooks.before_flag_clear()
        with self._lock:
            self._zapping = False
            self._flag_cleared.notify_all()

    @property
    def waiting(self) -> int:
        """How many vCPUs are waiting for a drain right now."""
        with self._lock:
            return self._waiting

    def wait(self, counters: Counters) -> None:
        """Wait until the vCPU holding the flag clears it."""
        counters.waits += 1
        with self._lock:
            self._waiting += 1
            while self._zapping:
                self._flag_cleared.wait()
            self._waiting -= 1

    def drain_or_wait(self, counters: Counters) -> Role:
        """Patch 9's ``kvm_zap_or_wait_mtrr_zap_list``."""
        if self.try_claim():
            self.drain(counters)
            return Role.DRAINED
        self.wait(counters)
        return Role.WAITED
