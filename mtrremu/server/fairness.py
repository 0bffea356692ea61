"""Fair service: streams are bounded in total and per client, and idle ones are ended.

Every call holds one of the server's worker threads while it runs, and a stream (``Execute``,
``DumpLeaves``, ``ExportVm``, ``ImportVm``) may run for as long as its client keeps it open.
Without bounds a few clients holding streams open could take every thread and starve health
checks and everyone else. So:

* at most ``max_streams`` streams run at once, and at most ``max_streams_per_client`` from one
  client (its host address; every unix-socket client is one local client); a stream beyond
  either is refused at once with ``RESOURCE_EXHAUSTED`` (reason ``LIMIT_EXCEEDED``);
* the worker threads beyond ``max_streams`` are therefore always left to unary calls and health
  checks;
* a stream that neither sends a request nor has one being worked on for
  ``stream_idle_seconds`` is cancelled by the server (the client sees ``CANCELLED``); waiting
  for the client to take a response is not work, so a client that stops reading is idle too.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from mtrremu.core.errors import InvalidArgument, ResourceExhausted


class _Call(Protocol):
    def peer(self) -> str: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on streaming calls (see the module docstring)."""

    max_streams: int = 128
    max_streams_per_client: int = 32
    stream_idle_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.max_streams_per_client < 1:
            raise InvalidArgument("max_streams and max_streams_per_client must be at least 1")
        if self.stream_idle_seconds <= 0:
            raise InvalidArgument("stream_idle_seconds must be positive")


def client_of(peer: str) -> str:
    """The client a gRPC peer string names: its host address (``ipv4:1.2.3.4:5678`` →
    ``ipv4:1.2.3.4``); every unix-socket peer is the one local client ``unix``."""
    if peer.startswith("unix"):
        return "unix"
    return peer.rsplit(":", 1)[0]


@dataclass(eq=False)
class Stream:
    """One admitted stream; :meth:`busy` marks the work it does for a request."""

    client: str
    call: _Call
    last_seen: float = field(default_factory=time.monotonic)
    working: int = 0

    def touch(self) -> None:
        self.last_seen = time.monotonic()


class StreamGuard:
    """Admits streams within :class:`StreamLimits` and cancels idle ones. Thread-safe."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._streams: set[Stream] = set()
        self._per_client: Counter[str] = Counter()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="mtrremu-idle", daemon=True)
        self._watchdog.start()

    def admit(self, call: _Call) -> Stream:
        """A stream for ``call``, or ``ResourceExhausted`` if a bound is reached."""
        client = client_of(call.peer())
        with self._lock:
            if len(self._streams) >= self.limits.max_streams:
                raise ResourceExhausted(
                    f"the server already runs {len(self._streams)} streams "
                    f"(--max-streams {self.limits.max_streams})"
                )
            if self._per_client[client] >= self.limits.max_streams_per_client:
                raise ResourceExhausted(
                    f"client {client} already runs {self._per_client[client]} streams "
                    f"(--max-streams-per-client {self.limits.max_streams_per_client})"
                )
            stream = Stream(client, call)
            self._streams.add(stream)
            self._per_client[client] += 1
            return stream

    def release(self, stream: Stream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.discard(stream)
                self._per_client[stream.client] -= 1

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(1.0, self.limits.stream_idle_seconds / 4)
        while not self._stop.wait(period):
            deadline = time.monotonic() - self.limits.stream_idle_seconds
            with self._lock:
                idle = [s for s in self._streams if not s.working and s.last_seen < deadline]
            for stream in idle:
                stream.call.cancel()
                self.release(stream)
