#!/usr/bin/env python3
"""Soak test: a real ``mtrremu serve`` under mixed, misbehaving load, killed and restarted.

What it runs (loopback and a unix socket in a temporary directory only; it stops by itself):

* ``mtrremu serve`` as a subprocess (``sys.executable -m mtrremu serve``) listening on
  127.0.0.1, [::1] (when the host has IPv6 loopback) and a unix socket, with
  ``--state-dir DIR --snapshot-interval S`` and tight stream bounds (``--max-streams``,
  ``--max-streams-per-client``, ``--stream-idle-timeout``, ``--max-batch-operations``).
* 8 VMs with realistic configurations (q35 and direct-boot memslots of 2 to 16 GiB, a device
  BAR, 2 to 8 vCPUs, 4K/2M/1G mapping levels, KVM and SDM precedence, non-coherent DMA so guest
  MTRRs are honoured) under several strategies: fine-grained, zap-all, kvm-6.5, kvm-6.11,
  precise, lazy, lazy:scope=changed, fine-grained-split-shared.
* ``--threads`` client threads (default 64) for ``--seconds`` seconds, each mixing every
  operation through unary calls and ``Execute`` batches (bursts included): MTRR, PAT and CR0
  writes, valid and invalid, guest and host, reads, accesses, fault ranges, DMA attach/detach,
  RESET, INIT, lookups, counters, staleness checks, DumpLeaves, GetVm, ListVms, export/import,
  VMs created and deleted, requests naming unknown VMs, vCPUs, initiators, malformed and
  oversized batches. A thread drives a vCPU only while it holds that vCPU (one thread per
  vCPU, as docs/vmm-guide.md#concurrency asks).
* Misbehaving clients: streams whose channel is closed mid-batch, batches cancelled, half an
  ``Execute`` request message sent over raw HTTP/2 and the connection dropped, streams that never
  read their replies, and ``--idle-streams`` (default 256) idle ``Execute`` streams held open
  over several channels and three clients (TCP v4, TCP v6, unix) so that both the per-client
  and the total stream caps refuse some (``RESOURCE_EXHAUSTED`` / ``LIMIT_EXCEEDED``, expected)
  and the server cancels idle ones (``CANCELLED``, expected); refused ones are retried.
* A health prober in a process of its own (so that this process's client threads do not
  inflate what it measures) calling ``grpc.health.v1.Health/Check`` every 10 ms.
* At ``--kill-at`` of the run, SIGKILL of the server, the snapshot files read, the server
  restarted on the same state directory, every VM that had a file checked (present, same leaf
  count by GetVm and DumpLeaves, same counters and registers), the staleness oracle asked, and
  the load resumed.
* At the end: a check that no stream slot leaked; each VM exported and imported, then the
  same operations sent to the original and the copy one at a time (the answers must be equal:
  docs/snapshots.md promises that an imported VM answers every later operation as the original
  would); the oracle at quiescence on every VM; then a graceful stop (SIGTERM) and restart
  whose VMs must be those before it, leaf for leaf.

What is measured, and the targets (exit status 1 if one is missed):

* ``ops``: operations answered (a unary call, each result of a batch, a stream read whole);
* ``errors_unexpected`` = 0: a status docs/api.md does not document for that call and input
  (UNKNOWN, INTERNAL, a DEADLINE_EXCEEDED of a health check or a short unary call, a refusal
  with the wrong status or reason, ...), an answer contradicting the docs (a guest #GP for a
  valid write or none for an invalid one, a batch entry without a result, an imported VM
  whose leaves differ from its snapshot or that answers an operation differently from its
  original, a restored VM whose counters or registers differ from its file, "not quiescent"
  while every vCPU reads back the same MTRRs and CR0.CD, a stream slot still held after every
  stream ended, a deleted VM back after a restart), a
  traceback in the server's log, or a server that does not exit 0 on SIGTERM. Expected
  refusals are counted by status, not as errors: INVALID_ARGUMENT for invalid input, guest
  #GPs, FAILED_PRECONDITION for a detach with no device, NOT_FOUND for unknown VMs and vCPUs,
  RESOURCE_EXHAUSTED for stream caps and oversized batches, CANCELLED for calls this script
  cancelled (or idle streams the server cancelled as idle). Calls cut by the SIGKILL are
  counted apart, by status;
* ``health_p99_ms`` <= 100: the 99th percentile of health-check latency while a server runs;
* ``lost_vms`` = 0: VMs with a snapshot file at the kill (and VMs present before the graceful
  stop) missing after the restart;
* ``lost_leaves`` = 0: the sum over those VMs of the difference between the leaf count the
  snapshot file holds (``read_snapshot_file(...).leaf_total``) and the restored VM's (GetVm and
  DumpLeaves, the larger difference);
* ``stale`` = 0: stale leaves the oracle finds at quiescence (``CheckStaleness`` with
  ``at_quiescence``, after every vCPU was given vCPU 0's MTRRs and CR0) after the restart and
  at the end, on the VMs whose strategy is meant to be correct under this load: ``precise``,
  ``lazy`` (both scopes) and ``kvm-6.11``. They declare no known gap, and the first two also
  handle host CR0 writes and RESET (``on_host_cd_change``), while under kvm-6.11's profile
  neither CR0.CD nor the MTRRs change a memory type, so nothing this load does may leave a leaf
  stale (docs/semantics.md). The other strategies reproduce KVM's gaps on purpose
  (docs/oracle.md#declared-gaps: ``cd-toggle``, ``moved-range``, ``straddling-leaf``) and,
  being faithful, never zap on host CR0 writes, RESET or INIT, and fine-grained's CD-toggle
  zap reads only the toggling vCPU's MTRRs: random writes from many vCPUs leave them stale by
  design. Their stale leaves are printed for information and not counted;
* ``peak_rss_mib``: the server process's peak resident memory (psutil, and VmHWM from
  /proc/<pid>/status), over both server processes; reported, no target.

The last line is exactly
``ops=<n> errors_unexpected=<n> health_p99_ms=<x> lost_vms=<n> lost_leaves=<n> stale=<n>
peak_rss_mib=<m>`` (one line). The workload's choices are drawn from ``--seed`` (each thread
has its own generator); the interleaving of threads is not deterministic. A global deadline
(the run's length plus set-up and check time) ends the script whatever happens.

    python scripts/soak.py --seconds 60 [--threads 64] [--idle-streams 256] [--seed 1]
        [--think-ms 0] [--kill-at 0.4] [--snapshot-interval 1] [--max-streams 96]
        [--max-streams-per-client 32] [--stream-idle-timeout 4]

By default the threads send back to back, which keeps the server's one interpreter (GIL) busy:
health-check latency then measures how well the server keeps health checks responsive under
saturation. ``--think-ms`` makes each thread pause between steps instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import multiprocessing
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtrremu.client import Client, RemoteVm
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, MemslotKind, VmConfig
from mtrremu.core.errors import MtrremuError
from mtrremu.core.events import (
    Access,
    AttachDma,
    Burst,
    CheckStaleness,
    DetachDma,
    FaultRange,
    Init,
    LookupGpa,
    MsrValue,
    Op,
    ReadCounters,
    ReadMsr,
    ReadVcpuState,
    Reset,
    VcpuOp,
    WriteCr0,
    WriteMsr,
    WriteMsrs,
)
from mtrremu.core.memtype import Precedence
from mtrremu.core.units import GIB, MIB, Level
from mtrremu.core.vm_state import VmState
from mtrremu.rpc import convert
from mtrremu.snapshot import SUFFIX, read_snapshot, read_snapshot_file
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.v1 import emulator_pb2_grpc as pb_grpc
from mtrremu.workloads.building import LINUX_CR0, LINUX_PAT, fixed_value, var_mask
from mtrremu.workloads.layouts import direct, q35

T = TypeVar("T")

#: Strategies held to "nothing stale at quiescence" (see the module docstring).
CHECKED_STRATEGIES = frozenset({"precise", "lazy", "kvm-6.11"})
EXECUTE_PATH = "/mtrremu.v1.EmulatorService/Execute"
HEALTH_TARGET_MS = 100.0
#: Server flag: small enough that an oversized batch is cheap to send.
MAX_BATCH = 4096
#: Deadlines (seconds): a short unary call, a batch stream, a long read (dump, export).
UNARY_TIMEOUT = 15.0
STREAM_TIMEOUT = 30.0
LONG_TIMEOUT = 60.0
PROBE_INTERVAL = 0.01
CD_NW_ET = 0x60000010
CR0_CD = 1 << 30


# -- results -----------------------------------------------------------------------------------


class Tally:
    """Every count the run reports. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.samples: list[str] = []
        self.cut: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()

    def op(self, name: str, count: int = 1) -> None:
        with self._lock:
            self.ops[name] += count

    def refused(self, status: str) -> None:
        with self._lock:
            self.refusals[status] += 1

    def note(self, name: str, count: int = 1) -> None:
        with self._lock:
            self.notes[name] += count

    def bad(self, what: str, detail: str = "") -> None:
        with self._lock:
            self.unexpected[what] += 1
            if len(self.samples) < 25:
                self.samples.append(f"{what}: {detail[:600]}" if detail else what)

    def killed(self, status: str) -> None:
        with self._lock:
            self.cut[status] += 1


@dataclass(frozen=True)
class Expect:
    """What the docs allow for one call or batch entry: the error statuses (``STATUS`` or
    ``STATUS/REASON``) it may end with, and what its outcome must show when it succeeds:
    ``ok`` (no #GP), ``gp`` (a #GP), ``rejected`` (WriteMsrs stopped early), ``any``."""

    errors: frozenset[str] = frozenset()
    outcome: str = "ok"

    def allows(self, code: str, reason: str) -> bool:
        return code in self.errors or f"{code}/{reason}" in self.errors

    def problem(self, outcome: pb.EventOutcome) -> str | None:
        gp = outcome.HasField("guest_fault")
        if self.outcome == "ok" and gp:
            return f"a guest #GP for a valid operation ({outcome.guest_fault.reason})"
        if self.outcome == "gp" and not gp:
            return "no guest #GP for an invalid guest operation"
        if self.outcome == "rejected" and not outcome.rejected:
            return "WriteMsrs wrote an invalid MSR"
        return None


def _expect(*errors: str, outcome: str = "ok") -> Expect:
    return Expect(frozenset(errors), outcome)


OK = _expect()
GP = _expect(outcome="gp")
REJECTED = _expect(outcome="rejected")
BAD_ARGUMENT = _expect("INVALID_ARGUMENT/INVALID_ARGUMENT")
BAD_HOST_WRITE = _expect("INVALID_ARGUMENT/HOST_WRITE_REJECTED")
NO_VCPU = _expect("NOT_FOUND/VCPU_NOT_FOUND")
NO_VM = _expect("NOT_FOUND/VM_NOT_FOUND")
DETACH = _expect("FAILED_PRECONDITION/FAILED_PRECONDITION")
STREAM_CAP = "RESOURCE_EXHAUSTED/LIMIT_EXCEEDED"
CAP_ONLY = _expect(STREAM_CAP)


def status_of(error: BaseException) -> tuple[str, str, str]:
    """``(status, reason, message)`` of a failed call (a grpc.RpcError, or the domain error
    the client raised from one)."""
    cause: BaseException | None = error
    if not isinstance(error, grpc.RpcError):
        cause = error.__cause__
    if isinstance(cause, grpc.RpcError) and isinstance(cause, grpc.Call):
        reason = ""
        for item in cause.trailing_metadata() or ():
            key, value = item
            if key == "mtrremu-reason":
                reason = str(value)
        return cause.code().name, reason, cause.details() or ""
    if isinstance(error, MtrremuError):
        return error.status, error.reason, str(error)
    return "NOT_A_STATUS", type(error).__name__, str(error)


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """Where one server incarnation listens, one gRPC target per client identity."""

    ipv4: str
    ipv6: str | None
    unix: str

    @property
    def port(self) -> int:
        return int(self.ipv4.rsplit(":", 1)[1])

    def by_identity(self) -> dict[str, str]:
        found = {"ipv4": self.ipv4, "unix": self.unix}
        if self.ipv6 is not None:
            found["ipv6"] = self.ipv6
        return found


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class ServerProcess:
    """``mtrremu serve`` in a subprocess; its standard error goes to ``log``."""

    def __init__(self, workdir: Path, state_dir: Path, flags: Sequence[str], ipv6: bool) -> None:
        self.workdir = workdir
        self.state_dir = state_dir
        self.flags = list(flags)
        self.ipv6 = ipv6
        self.log = workdir / "server.log"
        self.socket = workdir / "s.sock"
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> Targets:
        listen = ["--listen", "127.0.0.1:0", "--listen", f"unix:{self.socket}"]
        if self.ipv6:
            listen += ["--listen", "[::1]:0"]
        command = [
            sys.executable,
            "-m",
            "mtrremu",
            "serve",
            *listen,
            "--state-dir",
            str(self.state_dir),
            *self.flags,
        ]
        with self.log.open("a") as log:
            log.write(f"--- {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
            )
        self.process = process
        lines: list[str] = []
        got = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                if not lines:
                    lines.append(line)
                    got.set()
            got.set()

        threading.Thread(target=read, name="soak-server-stdout", daemon=True).start()
        if not got.wait(timeout) or not lines:
            self.kill()
            raise RuntimeError(f"the server did not announce its addresses (see {self.log})")
        prefix = "mtrremu: serving on "
        if not lines[0].startswith(prefix):
            self.kill()
            raise RuntimeError(f"unexpected first line from the server: {lines[0]!r}")
        ipv4 = ipv6 = unix = None
        for address in lines[0][len(prefix) :].strip().split(", "):
            if address.startswith("unix:"):
                unix = address
            elif address.startswith("["):
                ipv6 = f"ipv6:{address}"
            else:
                ipv4 = address
        if ipv4 is None or unix is None:
            self.kill()
            raise RuntimeError(f"the server did not listen where asked: {lines[0]!r}")
        return Targets(ipv4, ipv6, unix)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop); its exit status (-9 if it had to be killed)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


class Memory:
    """Samples the server's resident memory on a thread of its own."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._pid: int | None = None
        self._stop = threading.Event()
        self._psutil: Any = None
        with contextlib.suppress(ImportError):
            self._psutil = importlib.import_module("psutil")
        threading.Thread(target=self._run, name="soak-rss", daemon=True).start()

    def watch(self, pid: int | None) -> None:
        self.sample()
        self._pid = pid
        self.sample()

    def sample(self) -> None:
        pid = self._pid
        if pid is None:
            return
        found = 0
        status = Path(f"/proc/{pid}/status")
        try:
            for line in status.read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    found = max(found, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        if self._psutil is not None:
            with contextlib.suppress(Exception):  # any psutil failure: the process is gone
                found = max(found, int(self._psutil.Process(pid).memory_info().rss))
        self.peak_bytes = max(self.peak_bytes, found)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def close(self) -> None:
        self.sample()
        self._stop.set()


# -- the health prober (a process of its own) -----------------------------------------------


def probe_main(conn: Connection) -> None:
    """Health checks every PROBE_INTERVAL against the target the parent names; answers
    ``("paused",)`` to a pause and ``("done", latencies_ms, failures)`` to a stop."""
    channel: grpc.Channel | None = None
    stub: health_pb2_grpc.HealthStub | None = None
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    request = health_pb2.HealthCheckRequest(service="")
    serving = health_pb2.HealthCheckResponse.SERVING
    while True:
        try:
            waiting = conn.poll(0 if stub is not None else 0.1)
            command = conn.recv() if waiting else None
        except (EOFError, OSError):  # the parent is gone
            return
        while command is not None:
            if command[0] in ("pause", "stop") and channel is not None:
                channel.close()
                channel, stub = None, None
            if command[0] == "target":
                channel = grpc.insecure_channel(command[1])
                try:
                    grpc.channel_ready_future(channel).result(timeout=10)
                except grpc.FutureTimeoutError:
                    failures["not ready in 10 s"] += 1
                stub = health_pb2_grpc.HealthStub(channel)
            elif command[0] == "pause":
                conn.send(("paused",))
            elif command[0] == "stop":
                conn.send(("done", latencies, dict(failures)))
                return
            command = conn.recv() if conn.poll(0) else None
        if stub is None:
            continue
        started = time.perf_counter()
        try:
            answer = stub.Check(request, timeout=2.0)
            if answer.status == serving:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                failures[f"status {answer.status}"] += 1
        except grpc.RpcError as error:
            failures[error.code().name if isinstance(error, grpc.Call) else "error"] += 1
        time.sleep(PROBE_INTERVAL)


class Prober:
    """The parent's end of the health prober."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=probe_main, args=(child,), daemon=True)
        self._process.start()
        self.latencies: list[float] = []

    def target(self, target: str) -> None:
        self._conn.send(("target", target))

    def pause(self) -> None:
        self._conn.send(("pause",))
        if not self._conn.poll(10):
            self.tally.bad("health prober", "did not pause within 10 s")
            return
        self._conn.recv()

    def stop(self) -> None:
        self._conn.send(("stop",))
        if self._conn.poll(15):
            _, latencies, failures = self._conn.recv()
            self.latencies = list(latencies)
            for status, count in failures.items():
                for _ in range(count):
                    self.tally.bad(f"health check: {status}")
        else:
            self.tally.bad("health prober", "no answer within 15 s")
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()

    def summary(self) -> str:
        if not self.latencies:
            return "none answered"
        ordered = sorted(self.latencies)
        p50 = ordered[len(ordered) // 2]
        return (
            f"{len(ordered)} answered, p50 {p50:.1f} ms, p99 {self.p99():.1f} ms, "
            f"max {ordered[-1]:.1f} ms"
        )

    def p99(self) -> float:
        if not self.latencies:
            return math.inf
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# -- run control -------------------------------------------------------------------------------


class Control:
    """Stop, and the outage around the SIGKILL: threads park until the restart is checked."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.outage = threading.Event()
        self.epoch = 0
        self._cond = threading.Condition()
        self._parked = 0

    def running(self) -> bool:
        return not self.stop.is_set()

    def begin_outage(self) -> None:
        with self._cond:
            self.epoch += 1
            self.outage.set()

    def end_outage(self) -> None:
        with self._cond:
            self.outage.clear()
            self._cond.notify_all()

    def park(self) -> None:
        """Wait while an outage lasts (or until the run stops)."""
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self.outage.is_set() and not self.stop.is_set():
                self._cond.wait(0.1)
            self._parked -= 1

    def wait_parked(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._parked < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self) -> None:
        self.stop.set()
        with self._cond:
            self._cond.notify_all()

    def cut(self, epoch: int) -> bool:
        """Whether a call begun in ``epoch`` may have been cut by a kill."""
        return epoch != self.epoch or self.outage.is_set()


@dataclass
class Generation:
    """The clients of one server incarnation."""

    epoch: int
    targets: Targets
    workers: list[Client]
    #: One client on the TCP v4 address for checks and the misbehaving threads.
    main: Client
    #: One for the long reads (DumpLeaves, ExportVm, ImportVm), with a longer deadline.
    long: Client

    @classmethod
    def connect(cls, epoch: int, targets: Targets, channels: int) -> Generation:
        workers = [Client(targets.ipv4, timeout=UNARY_TIMEOUT) for _ in range(channels)]
        main = Client(targets.ipv4, timeout=UNARY_TIMEOUT)
        long = Client(targets.ipv4, timeout=LONG_TIMEOUT)
        for client in (*workers, main, long):
            client.wait_ready(15)
        return cls(epoch, targets, workers, main, long)

    def close(self) -> None:
        for client in (*self.workers, self.main, self.long):
            client.close()


# -- the fleet ---------------------------------------------------------------------------------


@dataclass
class VmInfo:
    """One of the soak's VMs, with a lock per vCPU (one client thread per vCPU)."""

    label: str
    strategy: str
    options: dict[str, str]
    config: VmConfig
    vm_id: str = ""
    locks: list[threading.Lock] = field(default_factory=list)
    dma: int = 0
    gone: bool = False

    def __post_init__(self) -> None:
        self.locks = [threading.Lock() for _ in range(self.config.vcpus)]
        self.dma = self.config.noncoherent_dma

    @property
    def vcpus(self) -> int:
        return self.config.vcpus

    @property
    def maxphyaddr(self) -> int:
        return self.config.guest_maxphyaddr

    @property
    def space(self) -> int:
        """The guest-physical space: addresses at or beyond it are refused."""
        return 1 << min(self.config.guest_maxphyaddr, 48)

    @property
    def checked(self) -> bool:
        return self.strategy in CHECKED_STRATEGIES

    def low_ram_end(self) -> int:
        for slot in self.config.memslots:
            if slot.name == "ram-low":
                return (slot.base_gfn + slot.pages) << 12
        return 2 * GIB


GPU_BAR = Memslot.from_bytes(0xE0000000, 256 * MIB, MemslotKind.DEVICE, "gpu-bar0")
VRAM = 0xFD000000


def fleet() -> list[VmInfo]:
    """The 8 VMs: what a few VMMs would configure, under several strategies."""
    return [
        VmInfo(
            "seabios-q35-8G",
            "fine-grained",
            {},
            VmConfig(vcpus=4, noncoherent_dma=1, memslots=q35(8 * GIB, vram=VRAM)),
        ),
        VmInfo(
            "q35-4G", "zap-all", {}, VmConfig(vcpus=4, noncoherent_dma=1, memslots=q35(4 * GIB))
        ),
        VmInfo(
            "q35-16G", "kvm-6.5", {}, VmConfig(vcpus=8, noncoherent_dma=1, memslots=q35(16 * GIB))
        ),
        VmInfo(
            "direct-4G",
            "kvm-6.11",
            {},
            VmConfig(vcpus=2, noncoherent_dma=1, memslots=direct(4 * GIB)),
        ),
        VmInfo(
            "q35-8G-gpu",
            "precise",
            {},
            VmConfig(
                vcpus=8,
                noncoherent_dma=1,
                max_mapping_level=Level.M2,
                memslots=(*q35(8 * GIB), GPU_BAR),
            ),
        ),
        VmInfo(
            "direct-6G", "lazy", {}, VmConfig(vcpus=4, noncoherent_dma=2, memslots=direct(6 * GIB))
        ),
        VmInfo(
            "q35-2G-4K",
            "lazy",
            {"scope": "changed"},
            VmConfig(vcpus=2, noncoherent_dma=1, max_mapping_level=Level.K4, memslots=q35(2 * GIB)),
        ),
        VmInfo(
            "q35-12G-sdm",
            "fine-grained-split-shared",
            {},
            VmConfig(
                vcpus=4,
                noncoherent_dma=1,
                guest_maxphyaddr=46,
                precedence=Precedence.SDM,
                memslots=q35(12 * GIB, vram=VRAM),
            ),
        ),
    ]


# -- what the guest and the VMM write ---------------------------------------------------------

MTRR_TYPES = (0, 1, 4, 5, 6)
PAT_TYPES = (0, 1, 4, 5, 6, 7)
FIXED_4K = tuple(range(msrs.FIX4K_C0000, msrs.FIX4K_F8000 + 1))
VALID_CR0 = (CD_NW_ET, 0x40000010, 0x60000011, 0x00000011, 0x00000010, 0x80000011, LINUX_CR0)
CD_SET = (CD_NW_ET, 0x60000011, 0x40000011)
CD_CLEAR = (0x00000011, LINUX_CR0)
INVALID_CR0 = ((1 << 32) | 0x11, 0x20000011, 0x80000010, 0xFFFFFFFF00000011)


def _pair_writes(index: int, base: int, size: int, mtype: int, mp: int) -> list[tuple[int, int]]:
    return [
        (msrs.PHYSBASE0 + 2 * index, base | mtype),
        (msrs.PHYSBASE0 + 2 * index + 1, var_mask(size, mp)),
    ]


def firmware_program(vm: VmInfo, rng: random.Random) -> list[tuple[int, int]]:
    """An MTRR programming sequence as firmware or a kernel does it (KVM_SET_MSRS order):
    MTRRs off, fixed ranges, variable pairs, MTRRs on."""
    mp = vm.maxphyaddr
    low = vm.low_ram_end()
    style = rng.choice(("seabios", "ovmf", "linux-wc", "off"))
    if style == "off":
        return [(msrs.DEFTYPE, 0)]
    writes: list[tuple[int, int]] = [(msrs.DEFTYPE, 0)]
    writes += [(msrs.FIX64K_00000, fixed_value(6)), (msrs.FIX16K_80000, fixed_value(6))]
    writes += [(msrs.FIX16K_A0000, fixed_value(0))]
    writes += [(m, fixed_value(rng.choice((5, 6)))) for m in FIXED_4K]
    pairs: list[list[tuple[int, int]]] = []
    if style == "seabios":  # UC default, WB over RAM
        size = 1 << (max(low, 1 << 21).bit_length() - 1)
        pairs.append(_pair_writes(0, 0, size, 6, mp))
        pairs.append(_pair_writes(1, 4 * GIB, 4 * GIB, 6, mp))
        default = 0xC00
    else:  # WB default, the PCI hole UC
        pairs.append(_pair_writes(0, 2 * GIB, 2 * GIB, 0, mp))
        default = 0xC06
        if style == "linux-wc":
            pairs.append(_pair_writes(1, VRAM, 16 * MIB, 1, mp))
    for index in range(len(pairs), msrs.VAR_PAIRS):
        pairs.append([(msrs.PHYSBASE0 + 2 * index, 0), (msrs.PHYSBASE0 + 2 * index + 1, 0)])
    for pair in pairs:
        writes += pair
    writes.append((msrs.DEFTYPE, default))
    return writes


def valid_msr_write(vm: VmInfo, rng: random.Random) -> tuple[int, int]:
    mp = vm.maxphyaddr
    pick = rng.random()
    if pick < 0.15:
        return msrs.DEFTYPE, rng.choice((0xC06, 0xC00, 0x806, 0x800, 0x0, 0x6, 0xC05, 0x400))
    if pick < 0.35:
        msr = rng.choice(msrs.FIXED_MSRS)
        if rng.random() < 0.5:
            return msr, fixed_value(rng.choice(MTRR_TYPES))
        return msr, int.from_bytes(bytes(rng.choice(MTRR_TYPES) for _ in range(8)), "little")
    if pick < 0.45:
        if rng.random() < 0.5:
            return msrs.PAT, rng.choice((LINUX_PAT, msrs.PAT_DEFAULT))
        return msrs.PAT, int.from_bytes(bytes(rng.choice(PAT_TYPES) for _ in range(8)), "little")
    pair = rng.randrange(msrs.VAR_PAIRS)
    size = 1 << rng.randrange(21, 34)
    if rng.random() < 0.5:
        base = rng.randrange(0, min(vm.space, 64 * GIB) // size) * size
        return msrs.PHYSBASE0 + 2 * pair, base | rng.choice(MTRR_TYPES)
    mask = var_mask(size, mp)
    if rng.random() < 0.2:
        mask &= ~msrs.PHYSMASK_VALID
    return msrs.PHYSBASE0 + 2 * pair + 1, mask


def invalid_msr_write(vm: VmInfo, rng: random.Random) -> tuple[int, int]:
    """A write KVM refuses: a reserved bit, an illegal type, a read-only or unknown MSR."""
    mp = vm.maxphyaddr
    pair = rng.randrange(msrs.VAR_PAIRS)
    return rng.choice(
        (
            (msrs.DEFTYPE, 0xC02),
            (msrs.DEFTYPE, 0x100 | 0x6),
            (msrs.DEFTYPE, (1 << 20) | 0xC06),
            (rng.choice(msrs.FIXED_MSRS), 0x0606060606060602),
            (msrs.PHYSBASE0 + 2 * pair, 0x7),
            (msrs.PHYSBASE0 + 2 * pair, 0x200 | 0x6),
            (msrs.PHYSBASE0 + 2 * pair, (1 << mp) | 0x6),
            (msrs.PHYSBASE0 + 2 * pair + 1, var_mask(1 << 30, mp) | 0x1),
            (msrs.PHYSBASE0 + 2 * pair + 1, (1 << 63) | var_mask(1 << 30, mp)),
            (msrs.PAT, 0x0007040600070402),
            (msrs.MTRRCAP, 0x508),
            (0x123, 0),
        )
    )


def readable_msr(rng: random.Random) -> int:
    return rng.choice((msrs.PAT, msrs.MTRRCAP, msrs.DEFTYPE, *msrs.FIXED_MSRS, *msrs.VAR_MSRS))


def ram_gpa(vm: VmInfo, rng: random.Random) -> int:
    slot = rng.choice(vm.config.memslots)
    return (slot.base_gfn << 12) + rng.randrange(slot.pages) * 4096 + rng.randrange(4096)


def hole_gpa(vm: VmInfo, rng: random.Random) -> int:
    """An address no memslot covers (VGA MMIO, the LAPIC, above RAM): an MMIO exit."""
    candidates = [0xA0000, 0xFEE00000, 0xFEC00000, 0x3_0000_0000 * 8]
    for gpa in rng.sample(candidates, len(candidates)):
        gfn = gpa >> 12
        inside = any(s.base_gfn <= gfn < s.base_gfn + s.pages for s in vm.config.memslots)
        if not inside and gpa < vm.space:
            return gpa
    return vm.space - 4096


def fault_span(vm: VmInfo, rng: random.Random) -> tuple[int, int]:
    slot = rng.choice(vm.config.memslots)
    length = rng.choice((4096, 2 * MIB, 64 * MIB, 256 * MIB, 1 * GIB))
    pages = max(1, min(slot.pages, length // 4096))
    first = slot.base_gfn + rng.randrange(slot.pages - pages + 1)
    return first << 12, (first + pages) << 12


# -- operations as planned -------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One operation as sent (its message), and what the docs allow for it."""

    name: str
    message: pb.Operation
    expect: Expect


def plan(name: str, op: Op | Burst, expect: Expect = OK) -> Planned:
    return Planned(name, convert.operation_message(op), expect)


def vcpu_operation(vm: VmInfo, vcpu: int, rng: random.Random) -> Planned:
    """One operation on ``vcpu`` (held by the caller), valid or not."""
    pick = rng.random()
    if pick < 0.16:
        msr, value = valid_msr_write(vm, rng)
        return plan("write_msr", WriteMsr(vcpu, msr, value))
    if pick < 0.22:
        msr, value = valid_msr_write(vm, rng)
        return plan("write_msr(host)", WriteMsr(vcpu, msr, value, host=True))
    if pick < 0.26:
        msr, value = invalid_msr_write(vm, rng)
        return plan("write_msr(invalid)", WriteMsr(vcpu, msr, value), GP)
    if pick < 0.29:
        msr, value = invalid_msr_write(vm, rng)
        return plan(
            "write_msr(host, invalid)", WriteMsr(vcpu, msr, value, host=True), BAD_HOST_WRITE
        )
    if pick < 0.34:
        program = firmware_program(vm, rng)
        if rng.random() < 0.25:
            cut = rng.randrange(len(program))
            program.insert(cut, invalid_msr_write(vm, rng))
            writes = WriteMsrs(vcpu, tuple(MsrValue(m, v) for m, v in program))
            return plan("write_msrs(invalid)", writes, REJECTED)
        return plan("write_msrs", WriteMsrs(vcpu, tuple(MsrValue(m, v) for m, v in program)))
    if pick < 0.38:
        host = rng.random() < 0.3
        return plan("read_msr", ReadMsr(vcpu, readable_msr(rng), host=host))
    if pick < 0.40:
        if rng.random() < 0.5:
            return plan("read_msr(invalid)", ReadMsr(vcpu, 0x123), GP)
        return plan("read_msr(host, invalid)", ReadMsr(vcpu, 0x123, host=True), BAD_ARGUMENT)
    if pick < 0.50:
        value = rng.choice(CD_SET if rng.random() < 0.5 else CD_CLEAR)
        return plan("write_cr0", WriteCr0(vcpu, value))
    if pick < 0.52:
        return plan("write_cr0(host)", WriteCr0(vcpu, rng.choice(VALID_CR0), host=True))
    if pick < 0.545:
        return plan("write_cr0(invalid)", WriteCr0(vcpu, rng.choice(INVALID_CR0)), GP)
    if pick < 0.56:
        bad = WriteCr0(vcpu, rng.choice(INVALID_CR0), host=True)
        return plan("write_cr0(host, invalid)", bad, BAD_HOST_WRITE)
    if pick < 0.575:
        return plan("reset_vcpu", Reset(vcpu))
    if pick < 0.59:
        return plan("init_vcpu", Init(vcpu))
    if pick < 0.72:
        return plan("access_gpa", Access(vcpu, ram_gpa(vm, rng)))
    if pick < 0.75:
        return plan("access_gpa(mmio)", Access(vcpu, hole_gpa(vm, rng)))
    if pick < 0.76:
        beyond = Access(vcpu, vm.space + rng.randrange(1 << 20))
        return plan("access_gpa(beyond)", beyond, BAD_ARGUMENT)
    if pick < 0.88:
        start, end = fault_span(vm, rng)
        return plan("fault_range", FaultRange(vcpu, start, end))
    if pick < 0.90:
        start, end = fault_span(vm, rng)
        bad_range = rng.choice(
            ((start + 1, end), (start, start), (end, start), (vm.space - 4096, vm.space + 4096))
        )
        return plan("fault_range(invalid)", FaultRange(vcpu, *bad_range), BAD_ARGUMENT)
    if pick < 0.95:
        return plan("read_vcpu_state", ReadVcpuState(vcpu))
    unknown = vm.vcpus + rng.randrange(4)
    return plan("unknown_vcpu", rng.choice((ReadVcpuState(unknown), Reset(unknown))), NO_VCPU)


def vm_operation(vm: VmInfo, rng: random.Random) -> Planned:
    """An operation on the VM as a whole (no vCPU held)."""
    pick = rng.random()
    if pick < 0.12:
        if rng.random() < (0.7 if vm.dma <= 1 else 0.3):
            return plan("attach_dma", AttachDma())
        return plan("detach_dma", DetachDma(), DETACH)
    if pick < 0.45:
        gpa = ram_gpa(vm, rng) if rng.random() < 0.8 else hole_gpa(vm, rng)
        return plan("lookup_gpa", LookupGpa(gpa))
    if pick < 0.48:
        return plan("lookup_gpa(beyond)", LookupGpa(vm.space + 4096), BAD_ARGUMENT)
    if pick < 0.70:
        return plan("read_counters", ReadCounters())
    if pick < 0.82:
        return plan("check_staleness(quiescence)", CheckStaleness(0, at_quiescence=True))
    if pick < 0.95:
        return plan("check_staleness", CheckStaleness(rng.randrange(vm.vcpus)))
    return plan("check_staleness(unknown vcpu)", CheckStaleness(vm.vcpus + 1), NO_VCPU)


def burst_lanes(vm: VmInfo, vcpus: Sequence[int], rng: random.Random) -> Burst:
    """vCPUs acting at once: APs toggling CD around an MTRR program, touching memory."""
    program = firmware_program(vm, rng)
    lanes: list[tuple[int, tuple[VcpuOp, ...]]] = []
    for vcpu in vcpus:
        ops: list[VcpuOp] = [WriteCr0(vcpu, CD_NW_ET | 1)]
        if rng.random() < 0.5:
            ops.append(WriteMsrs(vcpu, tuple(MsrValue(m, v) for m, v in program)))
        else:
            msr, value = valid_msr_write(vm, rng)
            ops.append(WriteMsr(vcpu, msr, value))
        ops.append(WriteCr0(vcpu, rng.choice(CD_CLEAR)))
        ops.append(Access(vcpu, ram_gpa(vm, rng)))
        if rng.random() < 0.3:
            start, end = fault_span(vm, rng)
            ops.append(FaultRange(vcpu, start, min(end, start + 64 * MIB)))
        if rng.random() < 0.2:
            ops.append(ReadVcpuState(vcpu))
        lanes.append((vcpu, tuple(ops)))
    return Burst(tuple(lanes), rng.getrandbits(32))


def malformed_entry(vm: VmInfo, held: Sequence[int], rng: random.Random) -> Planned:
    """A batch entry the docs say is refused on its own (the batch goes on)."""
    kind = rng.randrange(5)
    if kind == 0:
        return Planned("execute(no kind)", pb.Operation(), BAD_ARGUMENT)
    if kind == 1:
        message = pb.Operation()
        message.write_msr.CopyFrom(
            pb.WriteMsrOperation(
                vcpu=0, msr=msrs.PAT, value=msrs.PAT_DEFAULT, initiator=pb.Initiator.ValueType(7)
            )
        )
        return Planned("execute(unknown initiator)", message, BAD_ARGUMENT)
    if kind == 2:
        return Planned("execute(empty burst)", pb.Operation(burst=pb.Burst(seed=1)), BAD_ARGUMENT)
    if kind == 3 and held:
        vcpu = held[0]
        twice = Burst(((vcpu, (ReadVcpuState(vcpu),)), (vcpu, (ReadVcpuState(vcpu),))), 3)
        return plan("execute(burst, lane twice)", twice, BAD_ARGUMENT)
    unknown = vm.vcpus + 2
    lone = Burst(((unknown, (ReadVcpuState(unknown),)),), 5)
    return plan("execute(burst, unknown vcpu)", lone, NO_VCPU)


def refused_create(rng: random.Random) -> tuple[str, pb.CreateVmRequest, str]:
    """A CreateVm the docs say is refused, and the status it is refused with."""
    config = convert.vm_config_message(VmConfig())
    pick = rng.randrange(4)
    if pick == 0:
        config.vcpus = 5000
        request = pb.CreateVmRequest(config=config, strategy="fine-grained")
        return "create_vm(invalid config)", request, "INVALID_ARGUMENT/INVALID_VM_CONFIG"
    if pick == 1:
        config.memslots.add(base_gpa=0x1000, size_bytes=0x2000)
        request = pb.CreateVmRequest(config=config, strategy="zap-all")
        return "create_vm(overlapping memslots)", request, "INVALID_ARGUMENT/INVALID_VM_CONFIG"
    if pick == 2:
        request = pb.CreateVmRequest(config=config, strategy="no-such-strategy")
        return "create_vm(unknown strategy)", request, "NOT_FOUND/UNKNOWN_STRATEGY"
    request = pb.CreateVmRequest(
        config=config, strategy="precise", strategy_options={"colour": "blue"}
    )
    return "create_vm(undeclared option)", request, "INVALID_ARGUMENT/INVALID_ARGUMENT"


# -- raw HTTP/2: half a request, then hang up ---------------------------------------------------


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    encoded = b"\x00"
    for text in (name, value):
        data = text.encode()
        assert len(data) < 127
        encoded += bytes((len(data),)) + data
    return encoded


def half_batch(address: tuple[int, str | tuple[str, int]], message: bytes, linger: float) -> None:
    """Open an Execute stream over a raw HTTP/2 connection, send the first half of a
    length-prefixed ExecuteRequest, wait ``linger`` seconds and drop the connection."""
    family, where = address
    with socket.socket(family, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(where)
        headers = b"".join(
            _literal(name, value)
            for name, value in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", EXECUTE_PATH),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        prefixed = b"\x00" + struct.pack(">I", len(message)) + message
        raw.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(0x4, 0, 0, b"")
            + _frame(0x1, 0x4, 1, headers)
            + _frame(0x0, 0, 1, prefixed[: max(6, len(prefixed) // 2)])
        )
        time.sleep(linger)


# -- idle streams -------------------------------------------------------------------------------


@dataclass
class IdleSlot:
    identity: str
    channel: int
    call: Any = None
    release: threading.Event = field(default_factory=threading.Event)
    ours: bool = False
    epoch: int = 0
    retry_at: float = 0.0


def _idle_requests(release: threading.Event, limit: float) -> Iterator[pb.ExecuteRequest]:
    release.wait(limit)
    return
    yield


class IdleStreams:
    """Execute streams that never send a request, ``quota[identity]`` of them per client
    (TCP v4, TCP v6, unix) spread over a few channels each; each is reopened when it ends (at
    once when the server cancelled it as idle, 2 to 3 s later when a cap refused it)."""

    CHANNELS = 4

    def __init__(self, control: Control, tally: Tally, quota: dict[str, int], limit: float) -> None:
        self.control = control
        self.tally = tally
        self.limit = limit
        self.slots = [
            IdleSlot(identity, index % self.CHANNELS)
            for identity, count in quota.items()
            for index in range(count)
        ]
        self.channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()
        self.rng = random.Random(0)
        self._thread = threading.Thread(target=self._run, name="soak-idle", daemon=True)

    def connect(self, targets: Targets) -> None:
        with self._lock:
            old = list(self.channels.values())
            self.channels = {}
            for identity, target in targets.by_identity().items():
                for index in range(self.CHANNELS):
                    self.channels[(identity, index)] = grpc.insecure_channel(target)
        for channel in old:
            channel.close()

    def start(self) -> None:
        self._thread.start()

    def _open(self, slot: IdleSlot) -> None:
        with self._lock:
            channel = self.channels.get((slot.identity, slot.channel))
        if channel is None:
            return
        stub = channel.stream_stream(
            EXECUTE_PATH,
            request_serializer=pb.ExecuteRequest.SerializeToString,
            response_deserializer=pb.ExecuteResponse.FromString,
        )
        release = threading.Event()
        slot.release, slot.ours, slot.epoch = release, False, self.control.epoch
        slot.call = stub(_idle_requests(release, self.limit), timeout=self.limit)
        slot.call.add_done_callback(lambda _call: release.set())
        self.tally.note("idle streams opened")

    def _ended(self, slot: IdleSlot) -> None:
        call, slot.call = slot.call, None
        code = call.code()
        name = code.name if code is not None else "NONE"
        reason = ""
        for key, value in call.trailing_metadata() or ():
            if key == "mtrremu-reason":
                reason = str(value)
        delay = 0.0
        if slot.ours:
            return
        if self.control.cut(slot.epoch):
            self.tally.killed(name)
            return
        if name == "RESOURCE_EXHAUSTED" and reason == "LIMIT_EXCEEDED":
            details = call.details() or ""
            which = "total" if "--max-streams " in details else "per client"
            self.tally.note(f"idle streams refused ({which} cap)")
            self.tally.refused(f"{STREAM_CAP} (stream cap, {which})")
            delay = 2.0 + self.rng.random()
        elif name == "CANCELLED":
            self.tally.note("idle streams cancelled by the server")
            self.tally.refused("CANCELLED (idle stream)")
        elif name == "DEADLINE_EXCEEDED":
            self.tally.note("idle streams past their deadline")
        else:
            self.tally.bad(f"idle Execute stream: {name}/{reason}", call.details() or "")
            delay = 1.0
        slot.retry_at = time.monotonic() + delay

    def _run(self) -> None:
        while self.control.running():
            now = time.monotonic()
            for slot in self.slots:
                if not self.control.running():
                    break
                if slot.call is not None and slot.call.done():
                    self._ended(slot)
                if slot.call is None and not self.control.outage.is_set() and now >= slot.retry_at:
                    self._open(slot)
            self.control.stop.wait(0.1)

    def cancel_all(self) -> None:
        for slot in self.slots:
            if slot.call is not None:
                slot.ours = True
                slot.call.cancel()
            slot.release.set()

    def close(self) -> None:
        self._thread.join(10)
        self.cancel_all()
        for slot in self.slots:
            if slot.call is not None and slot.call.done():
                slot.call = None
        with self._lock:
            for channel in self.channels.values():
                channel.close()


# -- the load -----------------------------------------------------------------------------------


class Soak:
    """The run: the server, the fleet, the threads and the checks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tally = Tally()
        self.control = Control()
        self.vms = fleet()
        self.memory = Memory()
        self.generation: Generation | None = None
        self.gen_lock = threading.Lock()
        self.lost_vms = 0
        self.lost_leaves = 0
        self.stale = 0
        self.report: list[str] = []
        #: Temporary VMs whose DeleteVm answered OK (their files must be gone).
        self.deleted: set[str] = set()
        self.deleted_lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.health_line = "not measured"

    # -- plumbing --------------------------------------------------------------------------

    def gen(self) -> Generation:
        with self.gen_lock:
            assert self.generation is not None
            return self.generation

    def guarded(self, name: str, expect: Expect, epoch: int, call: Callable[[], T]) -> T | None:
        """``call()``, its failure judged against ``expect``: an allowed status is a refusal
        (the operation was answered), any other an unexpected error (unless a kill cut it)."""
        try:
            return call()
        except (grpc.RpcError, MtrremuError) as error:
            code, reason, details = status_of(error)
            if expect.allows(code, reason):
                self.tally.op(name)
                self.tally.refused(f"{code}/{reason}" if reason else code)
            elif self.control.cut(epoch):
                self.tally.killed(code)
            else:
                self.tally.bad(f"{name}: {code}/{reason}" if reason else f"{name}: {code}", details)
            return None

    def unary(self, vm_id: str, planned: Planned, epoch: int, client: Client) -> None:
        kind = planned.message.WhichOneof("kind")
        assert kind is not None
        rpc = "".join(part.capitalize() for part in kind.split("_"))
        request = getattr(pb, f"{rpc}Request")(vm_id=vm_id)
        request.operation.CopyFrom(getattr(planned.message, kind))
        method = getattr(client.stub, rpc)

        def call() -> pb.EventOutcome:
            outcome: pb.EventOutcome = method(request, timeout=UNARY_TIMEOUT).outcome
            return outcome

        outcome = self.guarded(planned.name, planned.expect, epoch, call)
        if outcome is not None:
            self.judge_outcome(planned, outcome)

    def judge_outcome(self, planned: Planned, outcome: pb.EventOutcome) -> None:
        problem = planned.expect.problem(outcome)
        if problem is not None:
            self.tally.bad(f"{planned.name}: {problem}", str(planned.message).replace("\n", " "))
        self.tally.op(planned.name)

    def execute(
        self,
        client: Client | grpc.Channel,
        batches: Sequence[tuple[str, Sequence[Planned]]],
        epoch: int,
        ends: Expect | None = None,
        name: str = "execute",
    ) -> int:
        """Send ``batches`` on one Execute stream and judge every result; the statuses the
        stream may end with are ``ends``. Returns the results read."""
        requests = [
            pb.ExecuteRequest(vm_id=vm_id, operations=[p.message for p in entries], batch_id=i)
            for i, (vm_id, entries) in enumerate(batches)
        ]
        ends = ends or CAP_ONLY
        stub = client.stub if isinstance(client, Client) else pb_grpc.EmulatorServiceStub(client)
        seen: list[set[int]] = [set() for _ in batches]
        read = 0

        def run() -> None:
            nonlocal read
            for response in stub.Execute(iter(requests), timeout=STREAM_TIMEOUT):
                entries = batches[response.batch_id][1]
                for result in response.results:
                    planned = entries[result.entry]
                    seen[response.batch_id].add(result.entry)
                    read += 1
                    if result.HasField("error"):
                        error = result.error
                        if planned.expect.allows(error.status, error.reason):
                            self.tally.op(planned.name)
                            self.tally.refused(f"{error.status}/{error.reason}")
                        else:
                            self.tally.bad(
                                f"{planned.name} (batch): {error.status}/{error.reason}",
                                error.message,
                            )
                    else:
                        self.judge_outcome(planned, result.outcome)
                if response.last and len(seen[response.batch_id]) != len(entries):
                    missing = len(entries) - len(seen[response.batch_id])
                    self.tally.bad(f"{name}: {missing} entries without a result")

        self.guarded(name, ends, epoch, run)
        return read

    # -- the server ---------------------------------------------------------------------------

    def server_flags(self) -> list[str]:
        a = self.args
        return [
            "--snapshot-interval",
            str(a.snapshot_interval),
            "--max-streams",
            str(a.max_streams),
            "--max-streams-per-client",
            str(a.max_streams_per_client),
            "--stream-idle-timeout",
            str(a.stream_idle_timeout),
            "--max-batch-operations",
            str(MAX_BATCH),
            "--max-workers",
            str(max(256, a.max_streams + 96)),
            "--log-level",
            "warning",
        ]

    def connect(self, targets: Targets) -> None:
        generation = Generation.connect(self.control.epoch, targets, channels=4)
        with self.gen_lock:
            old, self.generation = self.generation, generation
        if old is not None:
            old.close()

    # -- threads ------------------------------------------------------------------------------

    def worker(self, index: int) -> None:
        rng = random.Random(f"{self.args.seed}:worker:{index}")
        home = index % len(self.vms)
        while self.control.running():
            if self.control.outage.is_set():
                self.control.park()
                continue
            epoch = self.control.epoch
            generation = self.gen()
            client = generation.workers[index % len(generation.workers)]
            vm = self.vms[home] if rng.random() < 0.75 else rng.choice(self.vms)
            if vm.gone:
                vm = self.vms[home]
                if vm.gone:
                    time.sleep(0.05)
                    continue
            try:
                self.step(rng, vm, client, epoch)
            except Exception as error:  # a bug of this script: reported
                self.tally.bad(f"soak worker raised {type(error).__name__}", repr(error))
                time.sleep(0.05)
            if self.args.think_ms:
                time.sleep(rng.uniform(0.5, 1.5) * self.args.think_ms / 1000)

    def step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        pick = rng.random()
        if pick < 0.52:
            self.unary_step(rng, vm, client, epoch)
        elif pick < 0.74:
            self.batch_step(rng, vm, client, epoch, burst=False)
        elif pick < 0.79:
            self.batch_step(rng, vm, client, epoch, burst=True)
        elif pick < 0.82:
            self.dump_step(rng, vm, self.gen().long, epoch)
        elif pick < 0.87:
            self.describe_step(rng, vm, client, epoch)
        elif pick < 0.91:
            self.unknown_step(rng, vm, client, epoch)
        elif pick < 0.93:
            self.bad_batch_step(rng, vm, client, epoch)
        elif pick < 0.945:
            self.churn_step(rng, client, epoch)
        elif pick < 0.95:
            self.export_step(rng, vm, self.gen().long, epoch)
        else:
            self.unary_vm_step(rng, vm, client, epoch)

    def hold(self, vm: VmInfo, rng: random.Random, count: int) -> list[int]:
        """Up to ``count`` vCPUs of ``vm`` no other thread drives now, locked."""
        held: list[int] = []
        for vcpu in rng.sample(range(vm.vcpus), vm.vcpus):
            if len(held) == count:
                break
            if vm.locks[vcpu].acquire(blocking=False):
                held.append(vcpu)
        if not held:  # every vCPU is driven: wait a moment for one
            vcpu = rng.randrange(vm.vcpus)
            if vm.locks[vcpu].acquire(timeout=0.05):
                held.append(vcpu)
        return held

    def unhold(self, vm: VmInfo, held: Sequence[int]) -> None:
        for vcpu in held:
            vm.locks[vcpu].release()

    def unary_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        held = self.hold(vm, rng, 1)
        if not held:
            self.unary_vm_step(rng, vm, client, epoch)
            return
        try:
            for _ in range(rng.randint(1, 8)):
                if self.control.outage.is_set() or not self.control.running():
                    break
                self.unary(vm.vm_id, vcpu_operation(vm, held[0], rng), epoch, client)
        finally:
            self.unhold(vm, held)

    def unary_vm_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        planned = vm_operation(vm, rng)
        kind = planned.message.WhichOneof("kind")
        if kind in ("attach_dma", "detach_dma"):
            self.dma(vm, planned, client, epoch)
            return
        self.unary(vm.vm_id, planned, epoch, client)

    def dma(self, vm: VmInfo, planned: Planned, client: Client, epoch: int) -> None:
        """Attach or detach a device; the answer says how many remain (kept to steer the
        next choice, so that the count wanders around 1 and transitions happen)."""
        attach = planned.message.HasField("attach_dma")
        name = "attach_dma" if attach else "detach_dma"

        def call() -> pb.EventOutcome:
            if attach:
                request = pb.AttachDmaRequest(vm_id=vm.vm_id)
                return client.stub.AttachDma(request, timeout=UNARY_TIMEOUT).outcome
            detach = pb.DetachDmaRequest(vm_id=vm.vm_id)
            return client.stub.DetachDma(detach, timeout=UNARY_TIMEOUT).outcome

        outcome = self.guarded(name, OK if attach else DETACH, epoch, call)
        if outcome is not None:
            self.tally.op(name)
            if outcome.HasField("value"):
                vm.dma = outcome.value

    def batch_step(
        self, rng: random.Random, vm: VmInfo, client: Client, epoch: int, *, burst: bool
    ) -> None:
        held = self.hold(vm, rng, rng.randint(2, 4) if burst else rng.randint(1, 2))
        try:
            batches: list[tuple[str, list[Planned]]] = []
            for _ in range(rng.randint(1, 3)):
                entries: list[Planned] = []
                for _ in range(rng.randint(8, 96)):
                    roll = rng.random()
                    if held and roll < 0.75:
                        entries.append(vcpu_operation(vm, rng.choice(held), rng))
                    elif roll < 0.97:
                        entries.append(vm_operation(vm, rng))
                    else:
                        entries.append(malformed_entry(vm, held, rng))
                if burst and len(held) >= 2:
                    lanes = burst_lanes(vm, held, rng)
                    entries.insert(rng.randrange(len(entries) + 1), plan("burst", lanes))
                batches.append((vm.vm_id, entries))
            self.execute(client, batches, epoch)
        finally:
            self.unhold(vm, held)

    def bad_batch_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        """A batch naming an unknown VM after a good one, or one over the batch limit: both
        end the stream (NOT_FOUND, RESOURCE_EXHAUSTED)."""
        good = [plan("read_counters", ReadCounters()), plan("lookup_gpa", LookupGpa(0))]
        if rng.random() < 0.5:
            unknown = f"vm-{rng.getrandbits(128):032x}"
            batches = [(vm.vm_id, good), (unknown, good)]
            self.execute(client, batches, epoch, _expect("NOT_FOUND/VM_NOT_FOUND", STREAM_CAP))
        else:
            big = [plan("read_counters", ReadCounters())] * (MAX_BATCH + 1)
            self.execute(
                client, [(vm.vm_id, big)], epoch, _expect(STREAM_CAP), "execute(oversized)"
            )

    def dump_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        per_message = rng.choice((0, 1, 64, 4096, 65536, 70000))
        expect = BAD_ARGUMENT if per_message > 65536 else OK
        expect = Expect(expect.errors | {STREAM_CAP}, "any")
        name = "dump_leaves(invalid)" if per_message > 65536 else "dump_leaves"

        def call() -> int:
            return sum(run.leaves for run in client.vm(vm.vm_id).dump_leaves(per_message))

        if self.guarded(name, expect, epoch, call) is not None:
            self.tally.op(name)

    def describe_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        pick = rng.random()
        if pick < 0.5:
            if self.guarded("get_vm", OK, epoch, client.vm(vm.vm_id).describe) is not None:
                self.tally.op("get_vm")
        elif pick < 0.9:
            if self.guarded("list_vms", OK, epoch, client.list_vms) is not None:
                self.tally.op("list_vms")
        else:
            request = pb.ListVmsRequest(page_token=f"bogus-{rng.getrandbits(32)}")
            if self.guarded(
                "list_vms(bad token)",
                BAD_ARGUMENT,
                epoch,
                lambda: client.stub.ListVms(request, timeout=UNARY_TIMEOUT),
            ):
                self.tally.bad("list_vms(bad token): accepted a token ListVms never gave")

    def unknown_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        unknown = f"vm-{rng.getrandbits(128):032x}"
        pick = rng.random()
        if pick < 0.4:
            self.unary(unknown, plan("unknown_vm", ReadCounters(), NO_VM), epoch, client)
        elif pick < 0.6:
            request = pb.GetVmRequest(vm_id=unknown)
            self.guarded(
                "get_vm(unknown)",
                NO_VM,
                epoch,
                lambda: client.stub.GetVm(request, timeout=UNARY_TIMEOUT),
            )
        elif pick < 0.8:
            message = pb.Operation()
            message.read_msr.CopyFrom(
                pb.ReadMsrOperation(vcpu=0, msr=msrs.PAT, initiator=pb.Initiator.ValueType(5))
            )
            self.unary(
                vm.vm_id,
                Planned("read_msr(unknown initiator)", message, BAD_ARGUMENT),
                epoch,
                client,
            )
        else:
            request_d = pb.DeleteVmRequest(vm_id=unknown)
            self.guarded(
                "delete_vm(unknown)",
                NO_VM,
                epoch,
                lambda: client.stub.DeleteVm(request_d, timeout=UNARY_TIMEOUT),
            )

    def churn_step(self, rng: random.Random, client: Client, epoch: int) -> None:
        """CreateVm (valid, or refused: bad configuration, unknown strategy, undeclared
        option), a few operations, DeleteVm."""
        if rng.random() < 0.45:
            name, request, status = refused_create(rng)
            created = self.guarded(
                name,
                _expect(status),
                epoch,
                lambda: client.stub.CreateVm(request, timeout=UNARY_TIMEOUT),
            )
            if created is not None:
                self.tally.bad(f"{name}: created {created.vm.vm_id}")
                with contextlib.suppress(grpc.RpcError, MtrremuError):
                    client.vm(created.vm.vm_id).delete()
            return
        strategy = rng.choice(("fine-grained", "precise", "lazy", "zap-all-serialized", "kvm-6.7"))
        config = VmConfig(vcpus=2, noncoherent_dma=1, memslots=q35(1 * GIB))
        limit = _expect("RESOURCE_EXHAUSTED/LIMIT_EXCEEDED")
        remote = self.guarded("create_vm", limit, epoch, lambda: client.create_vm(config, strategy))
        if remote is None:
            return
        self.tally.op("create_vm")
        temp = VmInfo("temp", strategy, {}, config, vm_id=remote.vm_id)
        for _ in range(rng.randint(2, 10)):
            self.unary(temp.vm_id, vcpu_operation(temp, rng.randrange(2), rng), epoch, client)
        try:
            remote.delete()
        except (grpc.RpcError, MtrremuError) as error:
            code, reason, details = status_of(error)
            if self.control.cut(epoch):
                self.tally.killed(code)
            else:
                self.tally.bad(f"delete_vm: {code}/{reason}", details)
            return
        self.tally.op("delete_vm")
        with self.deleted_lock:
            self.deleted.add(remote.vm_id)

    def export_step(self, rng: random.Random, vm: VmInfo, client: Client, epoch: int) -> None:
        """ExportVm, the snapshot read back, ImportVm: the copy must hold the snapshot's
        leaves; then it is deleted."""
        allowed = _expect(STREAM_CAP, "FAILED_PRECONDITION/FAILED_PRECONDITION")
        data = self.guarded("export_vm", allowed, epoch, client.vm(vm.vm_id).export)
        if data is None:
            return
        self.tally.op("export_vm")
        state = read_snapshot(io.BytesIO(data))
        imported = self.guarded(
            "import_vm",
            _expect(STREAM_CAP, "RESOURCE_EXHAUSTED/LIMIT_EXCEEDED"),
            epoch,
            lambda: client.import_vm(data),
        )
        if imported is None:
            return
        self.tally.op("import_vm")
        described = self.guarded("get_vm", OK, epoch, imported.describe)
        if described is not None:
            leaves = described.leaves
            total = leaves.leaves_4k + leaves.leaves_2m + leaves.leaves_1g
            if total != state.leaf_total:
                self.tally.bad(
                    "import_vm: leaves differ from the snapshot",
                    f"{total} imported, {state.leaf_total} in the snapshot of {vm.vm_id}",
                )
        try:
            imported.delete()
            with self.deleted_lock:
                self.deleted.add(imported.vm_id)
        except (grpc.RpcError, MtrremuError) as error:
            code, reason, details = status_of(error)
            if self.control.cut(epoch):
                self.tally.killed(code)
            else:
                self.tally.bad(f"delete_vm(imported): {code}/{reason}", details)

    # -- misbehaving clients ---------------------------------------------------------------

    def chaos(self, index: int, kind: str) -> None:
        rng = random.Random(f"{self.args.seed}:chaos:{kind}:{index}")
        while self.control.running():
            if self.control.outage.is_set():
                self.control.park()
                continue
            epoch = self.control.epoch
            vm = rng.choice([v for v in self.vms if not v.gone] or self.vms)
            try:
                getattr(self, f"chaos_{kind}")(rng, vm, epoch)
            except Exception as error:  # a bug of this script: reported
                self.tally.bad(f"soak chaos {kind} raised {type(error).__name__}", repr(error))
            self.control.stop.wait(rng.uniform(0.05, 0.3))

    def _heavy_batches(self, vm: VmInfo, vcpu: int, rng: random.Random) -> list[pb.ExecuteRequest]:
        ops: list[Op] = []
        for _ in range(200):
            start, end = fault_span(vm, rng)
            ops.append(FaultRange(vcpu, start, end))
            ops.append(WriteMsr(vcpu, msrs.DEFTYPE, rng.choice((0xC06, 0xC00)), host=True))
        messages = [convert.operation_message(op) for op in ops]
        return [
            pb.ExecuteRequest(vm_id=vm.vm_id, operations=messages[i : i + 100], batch_id=i // 100)
            for i in range(0, len(messages), 100)
        ]

    def _judge_stream_end(
        self, name: str, error: grpc.RpcError, epoch: int, allowed: Expect
    ) -> None:
        code, reason, details = status_of(error)
        if allowed.allows(code, reason):
            self.tally.refused(f"{code}/{reason}" if reason else f"{code} ({name})")
            self.tally.note(f"{name}: {code}")
        elif self.control.cut(epoch):
            self.tally.killed(code)
        else:
            self.tally.bad(f"{name}: {code}/{reason}", details)

    def chaos_disconnect(self, rng: random.Random, vm: VmInfo, epoch: int) -> None:
        """Close the channel while a batch stream runs."""
        channel = grpc.insecure_channel(self.gen().targets.ipv4)
        try:
            stub = pb_grpc.EmulatorServiceStub(channel)
            self._interrupted(
                rng,
                vm,
                epoch,
                stub=stub,
                stop=lambda call: channel.close,
                delay=(0.01, 0.3),
                what="disconnect",
            )
        finally:
            channel.close()

    def chaos_cancel(self, rng: random.Random, vm: VmInfo, epoch: int) -> None:
        """Cancel a batch stream while it runs."""
        stub = self.gen().main.stub
        self._interrupted(
            rng,
            vm,
            epoch,
            stub=stub,
            stop=lambda call: call.cancel,
            delay=(0.005, 0.2),
            what="cancel",
        )

    def _interrupted(
        self,
        rng: random.Random,
        vm: VmInfo,
        epoch: int,
        *,
        stub: pb_grpc.EmulatorServiceStub,
        stop: Callable[[Any], Callable[[], object]],
        delay: tuple[float, float],
        what: str,
    ) -> None:
        """A batch stream that ``stop(call)`` ends early (``what``: ``disconnect``, closing its
        channel, or ``cancel``) after a random ``delay``: it ends CANCELLED (or refused by a
        stream cap), or finished first."""

        held = self.hold(vm, rng, 1)
        if not held:
            return
        try:
            call = stub.Execute(iter(self._heavy_batches(vm, held[0], rng)), timeout=STREAM_TIMEOUT)
            timer = threading.Timer(rng.uniform(*delay), stop(call))
            timer.start()
            try:
                for _ in call:
                    pass
                self.tally.note(f"{what}: the batch finished first")
            except grpc.RpcError as error:
                ended = {"disconnect": "disconnected stream", "cancel": "cancelled stream"}[what]
                self._judge_stream_end(ended, error, epoch, _expect("CANCELLED", STREAM_CAP))
            finally:
                timer.join()
        finally:
            self.unhold(vm, held)

    def chaos_half(self, rng: random.Random, vm: VmInfo, epoch: int) -> None:
        """Half an ExecuteRequest over raw HTTP/2 (TCP or the unix socket), then hang up."""
        targets = self.gen().targets
        message = pb.ExecuteRequest(
            vm_id=vm.vm_id,
            operations=[convert.operation_message(ReadCounters()) for _ in range(50)],
        ).SerializeToString()
        address: tuple[int, str | tuple[str, int]]
        if rng.random() < 0.5:
            address = (socket.AF_INET, ("127.0.0.1", targets.port))
        else:
            address = (socket.AF_UNIX, targets.unix[len("unix:") :])
        try:
            half_batch(address, message, rng.uniform(0.01, 0.3))
            self.tally.note("half batches sent")
        except OSError as error:
            if not self.control.cut(epoch):
                self.tally.bad("half batch: connection failed", repr(error))

    def chaos_unread(self, rng: random.Random, vm: VmInfo, epoch: int) -> None:
        """A stream whose replies are never read (an Execute batch with large results, or a
        DumpLeaves), held beyond the idle timeout, then cancelled."""
        hold = min(self.args.stream_idle_timeout * 1.5, 8.0)
        stub = self.gen().main.stub
        if rng.random() < 0.6:
            ops = [ReadVcpuState(v) for v in range(vm.vcpus)] * (1200 // vm.vcpus)
            messages = [convert.operation_message(op) for op in ops]
            requests = [
                pb.ExecuteRequest(vm_id=vm.vm_id, operations=messages, batch_id=i) for i in range(3)
            ]
            call: Any = stub.Execute(iter(requests), timeout=hold + 10)
            name = "unread Execute"
        else:
            call = stub.DumpLeaves(
                pb.DumpLeavesRequest(vm_id=vm.vm_id, runs_per_message=1), timeout=hold + 10
            )
            name = "unread DumpLeaves"
        ended = self.wait_unless_paused(hold)
        if call.done():
            code = call.code()
            if self.control.cut(epoch):
                self.tally.killed(code.name)
            elif code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                self.tally.note(f"{name}: ended by the server ({code.name})")
            elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.tally.refused(f"{STREAM_CAP} ({name})")
            else:
                self.tally.bad(f"{name}: {code.name}", call.details() or "")
        elif ended:
            self.tally.note(f"{name}: cancelled early (the run stopped or the server was killed)")
        else:  # the server does not treat a stream blocked on its reader as idle
            self.tally.note(f"{name}: still open after {hold:g} s, then cancelled")
        call.cancel()

    def wait_unless_paused(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if the run stops or an outage begins (then True)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self.control.stop.is_set() or self.control.outage.is_set():
                return True
            time.sleep(0.05)
        return False

    # -- checks ---------------------------------------------------------------------------

    def settle(self, client: Client, vm: VmInfo, when: str) -> str | None:
        """Give every vCPU vCPU 0's MTRRs and CR0 (the writes a VMM or guest would make), then
        ask the oracle at quiescence; counts the stale leaves (``stale`` if the strategy is
        checked) and returns them as ``label count`` for the report.

        docs/oracle.md: the VM is quiescent when every vCPU holds the same MTRRs and CR0.CD.
        A "not quiescent" answer while every vCPU reads back the same values is an unexpected
        answer; the MTRRs are then written to vCPU 0 as well (every register written, as a VMM
        pushing them all would) and the oracle asked again, so that staleness is still
        measured."""
        remote = client.vm(vm.vm_id)
        answer = None
        targets = range(1, vm.vcpus)
        for attempt in range(3):  # a cancelled batch may still finish its running entry
            try:
                state = remote.vcpu_state(0)
                values = [(m.msr, m.value) for m in state.mtrrs]
                for vcpu in targets:
                    outcome = remote.write_msrs(vcpu, values)
                    if outcome.rejected or outcome.value != len(values):
                        self.tally.bad(f"{when}: vCPU 0's MTRRs refused", outcome.rejected)
                    cr0 = remote.write_cr0(vcpu, state.cr0)
                    if cr0.HasField("guest_fault"):
                        self.tally.bad(f"{when}: #GP writing vCPU 0's CR0", cr0.guest_fault.reason)
                answer = remote.staleness(at_quiescence=True)
            except (grpc.RpcError, MtrremuError) as error:
                code, reason, details = status_of(error)
                self.tally.bad(f"{when}: settling {vm.label}: {code}/{reason}", details)
                return None
            if answer.quiescent and answer.HasField("stale_leaves"):
                break
            differences = self.disagreement(remote, vm)
            if not differences and attempt < 2:
                self.tally.bad(
                    "CheckStaleness: not quiescent while every vCPU reads back the same MTRRs "
                    "and CR0.CD",
                    f"{when}, {vm.label} ({vm.strategy})",
                )
                targets = range(vm.vcpus)
            elif attempt < 2:
                time.sleep(0.5)
        if answer is None or not answer.quiescent or not answer.HasField("stale_leaves"):
            self.tally.bad(
                f"{when}: {vm.label} ({vm.strategy}) not quiescent after settling",
                self.disagreement(remote, vm) or "every vCPU reads back the same",
            )
            return None
        stale = answer.stale_leaves
        label = f"{vm.strategy}{''.join(f':{k}={v}' for k, v in vm.options.items())}"
        if vm.checked:
            self.stale += stale
            return f"{label} {stale}"
        return f"({label} {stale})"

    def disagreement(self, remote: RemoteVm, vm: VmInfo) -> str:
        """Which vCPUs hold other MTRRs or CR0.CD than vCPU 0 (for the report)."""
        try:
            states = [remote.vcpu_state(vcpu) for vcpu in range(vm.vcpus)]
        except (grpc.RpcError, MtrremuError) as error:
            return f"cannot read the vCPUs back: {status_of(error)[0]}"
        first = states[0]
        found = []
        for vcpu, state in enumerate(states[1:], 1):
            if (state.cr0 ^ first.cr0) & CR0_CD:
                found.append(f"vCPU {vcpu} CR0 {state.cr0:#x} (vCPU 0 {first.cr0:#x})")
            for mine, theirs in zip(state.mtrrs, first.mtrrs, strict=True):
                if mine.value != theirs.value:
                    found.append(
                        f"vCPU {vcpu} MSR {mine.msr:#x} {mine.value:#x} (vCPU 0 {theirs.value:#x})"
                    )
        return "; ".join(found)

    def replay_check(self, generation: Generation, vm: VmInfo) -> bool:
        """docs/snapshots.md: an imported VM "answers every later operation exactly as the
        original would have". The VM is exported and imported, then the same operations go
        to both, one at a time (MTRRs on, memory faulted in, every variable pair's base
        rewritten, then random operations): every answer must be the same. True if so."""
        original = generation.long.vm(vm.vm_id)
        try:
            copy = generation.long.import_vm(original.export())
        except (grpc.RpcError, MtrremuError) as error:
            code, reason, details = status_of(error)
            self.tally.bad(f"export and import of {vm.label}: {code}/{reason}", details)
            return False
        rng = random.Random(f"{self.args.seed}:replay:{vm.label}")
        planned: list[Planned] = []
        for vcpu in range(min(vm.vcpus, 2)):
            planned.append(plan("write_msr", WriteMsr(vcpu, msrs.DEFTYPE, 0xC06, host=True)))
            planned.append(plan("write_cr0", WriteCr0(vcpu, LINUX_CR0)))
            planned.append(plan("fault_range", FaultRange(vcpu, *fault_span(vm, rng))))
            for pair in range(msrs.VAR_PAIRS):
                base = rng.randrange(1, 8) * GIB | rng.choice(MTRR_TYPES)
                planned.append(plan("write_msr", WriteMsr(vcpu, msrs.PHYSBASE0 + 2 * pair, base)))
        planned += [vcpu_operation(vm, rng.randrange(min(vm.vcpus, 2)), rng) for _ in range(30)]
        same = True
        try:
            for step in planned:
                answers = [self.answer(remote, step) for remote in (original, copy)]
                if answers[0] != answers[1]:
                    self.tally.bad(
                        "an imported VM answers differently from its original",
                        f"{vm.label} ({vm.strategy}), {step.name} "
                        f"{{{text_format.MessageToString(step.message, as_one_line=True)}}}: "
                        f"original {{{answers[0]}}}, imported {{{answers[1]}}}",
                    )
                    same = False
                    break
        finally:
            with contextlib.suppress(grpc.RpcError, MtrremuError):
                copy.delete()
        return same

    @staticmethod
    def answer(remote: RemoteVm, planned: Planned) -> str:
        """An operation's answer, as text: its outcome, or its status and reason."""
        kind = planned.message.WhichOneof("kind")
        assert kind is not None
        rpc = "".join(part.capitalize() for part in kind.split("_"))
        request = getattr(pb, f"{rpc}Request")(vm_id=remote.vm_id)
        request.operation.CopyFrom(getattr(planned.message, kind))
        try:
            response = getattr(remote.client.stub, rpc)(request, timeout=UNARY_TIMEOUT)
        except grpc.RpcError as error:
            code, reason, _ = status_of(error)
            return f"{code}/{reason}"
        return str(text_format.MessageToString(response.outcome, as_one_line=True))

    def settle_all(self, client: Client, when: str) -> None:
        found = [self.settle(client, vm, when) for vm in self.vms if not vm.gone]
        self.report.append(
            f"stale leaves at quiescence {when}: "
            + ", ".join(text for text in found if text is not None)
            + " (in parentheses: strategies with known gaps, not counted)"
        )

    def leaves_of(self, client: Client, vm_id: str) -> tuple[int, int] | None:
        """The leaves of a VM by GetVm and by DumpLeaves, or None if it does not exist."""
        remote = client.vm(vm_id)
        try:
            leaves = remote.describe().leaves
            dumped = sum(run.leaves for run in remote.dump_leaves())
        except (grpc.RpcError, MtrremuError) as error:
            code, reason, details = status_of(error)
            if code != "NOT_FOUND":
                self.tally.bad(f"reading VM {vm_id} back: {code}/{reason}", details)
            return None
        return leaves.leaves_4k + leaves.leaves_2m + leaves.leaves_1g, dumped

    def compare(self, client: Client, expected: dict[str, int], when: str) -> None:
        lost_vms = lost_leaves = 0
        for vm_id, total in expected.items():
            found = self.leaves_of(client, vm_id)
            if found is None:
                lost_vms += 1
                continue
            lost_leaves += max(abs(total - found[0]), abs(total - found[1]))
        self.lost_vms += lost_vms
        self.lost_leaves += lost_leaves
        self.report.append(
            f"{when}: {len(expected)} VMs expected back, {lost_vms} missing, "
            f"leaf count differences {lost_leaves}"
        )

    def snapshot_files(self, state_dir: Path) -> dict[str, VmState]:
        """Every snapshot file of the state directory, read (the server is dead: they are
        what it left)."""
        found: dict[str, VmState] = {}
        for path in sorted(state_dir.glob(f"*{SUFFIX}")):
            try:
                state = read_snapshot_file(path)
            except MtrremuError as error:
                self.tally.bad(
                    "a state-directory file does not read back after kill -9",
                    f"{path.name}: {error}",
                )
                continue
            found[state.vm_id] = state
        return found

    def restored_as_saved(self, client: Client, states: dict[str, VmState]) -> None:
        """Beyond the leaves: a restored VM's counters and registers are its file's."""
        for vm_id, state in states.items():
            remote = client.vm(vm_id)
            try:
                counters = remote.counters()
                registers = [remote.vcpu_state(vcpu) for vcpu in range(len(state.vcpus))]
            except (grpc.RpcError, MtrremuError):
                continue  # a missing VM is counted in lost_vms
            if counters != state.counters:
                self.tally.bad("a restored VM's counters differ from its snapshot file", vm_id)
            for vcpu, (saved, read) in enumerate(zip(state.vcpus, registers, strict=True)):
                mtrrs = tuple(m.value for m in read.mtrrs)
                if (read.cr0, read.pat, mtrrs) != (saved.cr0, saved.pat, saved.mtrrs):
                    self.tally.bad(
                        "a restored vCPU's registers differ from its snapshot file",
                        f"{vm_id} vCPU {vcpu}",
                    )

    def sweep_temporaries(self, client: Client) -> None:
        """Delete the VMs besides the fleet (temporaries a file brought back)."""
        keep = {vm.vm_id for vm in self.vms}
        for described in client.list_vms():
            if described.vm_id not in keep:
                try:
                    client.vm(described.vm_id).delete()
                except (grpc.RpcError, MtrremuError) as error:
                    code, reason, details = status_of(error)
                    if code != "NOT_FOUND":
                        self.tally.bad(
                            f"deleting a restored temporary VM: {code}/{reason}", details
                        )

    def slot_leak_check(self, generation: Generation) -> None:
        """With every stream ended, one client must be able to open its whole quota."""
        per_client = self.args.max_streams_per_client
        deadline = time.monotonic() + 5
        while True:
            streams = IdleStreams(self.control, Tally(), {"ipv4": per_client}, 20.0)
            streams.connect(generation.targets)
            for slot in streams.slots:
                streams._open(slot)
            time.sleep(0.5)
            refused = [s for s in streams.slots if s.call is not None and s.call.done()]
            details = refused[0].call.details() if refused else ""
            streams.cancel_all()
            with streams._lock:
                for channel in streams.channels.values():
                    channel.close()
            if not refused:
                self.report.append(
                    f"stream slots after the load: {per_client} streams admitted, none leaked"
                )
                return
            if time.monotonic() > deadline:
                self.tally.bad(
                    "stream slots leaked: a client holding no stream is refused",
                    f"{len(refused)} of {per_client} refused: {details}",
                )
                return
            time.sleep(0.5)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        started = time.monotonic()
        hard_deadline = started + args.seconds + 150
        threading.Thread(
            target=self._watchdog, args=(hard_deadline,), name="soak-watchdog", daemon=True
        ).start()
        with tempfile.TemporaryDirectory(prefix="mtrremu-soak-") as temporary:
            workdir = Path(temporary)
            state_dir = workdir / "state"
            self.server = ServerProcess(workdir, state_dir, self.server_flags(), ipv6_loopback())
            try:
                return self._run(state_dir)
            except Exception as error:  # any failure of the run itself is reported, not raised
                traceback.print_exc()
                self.tally.bad(f"the soak stopped early: {type(error).__name__}", str(error))
                return self.print_result(math.inf)
            finally:
                self.control.shutdown()
                self.server.kill()

    def _watchdog(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            time.sleep(1)
        sys.stderr.write("soak: global deadline passed, giving up\n")
        try:
            self.server.kill()
        finally:
            self.print_result(math.inf, aborted=True)
            os._exit(3)

    def _run(self, state_dir: Path) -> int:
        args = self.args
        prober = Prober(self.tally)  # its process starts while the server does
        targets = self.server.start()
        self.memory.watch(self.server.pid)
        self.connect(targets)
        main = self.gen().main
        names = {s.name for s in main.list_strategies()}
        for vm in self.vms:
            if vm.strategy not in names:
                self.report.append(
                    f"strategy {vm.strategy} not installed: {vm.label} uses fine-grained"
                )
                vm.strategy, vm.options = "fine-grained", {}
            vm.vm_id = main.create_vm(vm.config, vm.strategy, vm.options).vm_id
            seed_rng = random.Random(f"{args.seed}:setup:{vm.label}")
            for vcpu in range(vm.vcpus):
                program = firmware_program(vm, seed_rng)
                main.vm(vm.vm_id).write_msrs(vcpu, program)
                main.vm(vm.vm_id).write_cr0(vcpu, LINUX_CR0)
        prober.target(targets.ipv4)
        quota = self.idle_quota(targets)
        idle = IdleStreams(self.control, self.tally, quota, args.seconds + 120)
        idle.connect(targets)
        idle.start()
        for index in range(args.threads):
            self._spawn(self.worker, (index,), f"soak-worker-{index}")
        chaos_kinds = ("disconnect", "cancel", "half", "unread", "half", "unread")
        for index, kind in enumerate(chaos_kinds):
            self._spawn(self.chaos, (index, kind), f"soak-chaos-{kind}-{index}")
        load_started = time.monotonic()
        end = load_started + args.seconds
        kill_at = load_started + args.seconds * args.kill_at if args.kill_at > 0 else math.inf
        while time.monotonic() < min(end, kill_at):
            time.sleep(0.05)
        if time.monotonic() < end:
            self.kill_and_restart(prober, idle, state_dir, time.monotonic() - load_started)
        while time.monotonic() < end:
            time.sleep(0.05)
        # -- the end ------------------------------------------------------------------------
        self.control.shutdown()
        prober.stop()
        self.health_line = prober.summary()
        joined_by = time.monotonic() + STREAM_TIMEOUT + 10
        for thread in self.threads:
            thread.join(max(0.0, joined_by - time.monotonic()))
            if thread.is_alive():
                self.tally.bad(f"soak thread {thread.name} did not stop")
        time.sleep(0.5)  # what cancelled batches were running when they ended finishes
        idle.close()
        generation = self.gen()
        self.slot_leak_check(generation)
        self.sweep_temporaries(generation.main)
        replayed = [self.replay_check(generation, vm) for vm in self.vms if not vm.gone]
        self.report.append(
            f"export, import and the same operations on both: {sum(replayed)} of "
            f"{len(replayed)} imported VMs answered as their original"
        )
        self.settle_all(generation.main, "at the end")
        self.graceful_restart(generation)
        self.scan_log()
        self.memory.close()
        return self.print_result(prober.p99())

    def idle_quota(self, targets: Targets) -> dict[str, int]:
        """Idle streams per client: a few on the workers' own TCP v4 client, the rest over
        the unix socket and TCP v6 (far beyond their per-client cap)."""
        total = self.args.idle_streams
        ipv4 = min(total, self.args.max_streams_per_client // 4)
        rest = total - ipv4
        if targets.ipv6 is None:
            return {"ipv4": ipv4, "unix": rest}
        return {"ipv4": ipv4, "unix": rest - rest // 2, "ipv6": rest // 2}

    def _spawn(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def kill_and_restart(
        self, prober: Prober, idle: IdleStreams, state_dir: Path, at: float
    ) -> None:
        prober.pause()
        self.control.begin_outage()
        self.memory.sample()
        self.server.kill()
        killed_at = time.monotonic()
        files = self.snapshot_files(state_dir)
        with self.deleted_lock:
            back_after_delete = sorted(set(files) & self.deleted)
        for vm_id in back_after_delete:
            self.tally.bad("a VM deleted before the kill still has its snapshot file", vm_id)
        if not self.control.wait_parked(len(self.threads), 60):
            self.tally.bad("soak threads did not stop for the restart within 60 s")
        targets = self.server.start()
        restarted = time.monotonic() - killed_at
        self.memory.watch(self.server.pid)
        self.connect(targets)
        generation = self.gen()
        present = {vm.vm_id for vm in self.vms}
        for vm in self.vms:
            if vm.vm_id not in files:
                vm.gone = True
                self.report.append(
                    f"{vm.label} had no snapshot file at the kill (not expected back)"
                )
        self.report.append(
            f"kill -9 at {at:.1f} s of load: {len(files)} snapshot files "
            f"({len(set(files) & present)} of the fleet, "
            f"{sum(f.leaf_total for f in files.values())} leaves); "
            f"restarted in {restarted:.1f} s"
        )
        self.compare(generation.main, {i: f.leaf_total for i, f in files.items()}, "after kill -9")
        self.restored_as_saved(generation.main, files)
        self.sweep_temporaries(generation.main)
        self.settle_all(generation.main, "after the restart")
        idle.connect(targets)
        prober.target(targets.ipv4)
        self.control.end_outage()

    def graceful_restart(self, generation: Generation) -> None:
        """SIGTERM (every VM written at shutdown), restart: every VM back, leaf for leaf."""
        before: dict[str, int] = {}
        for vm in self.vms:
            if vm.gone:
                continue
            found = self.leaves_of(generation.main, vm.vm_id)
            if found is not None:
                before[vm.vm_id] = found[0]
        generation.close()
        status = self.server.stop()
        if status != 0:
            self.tally.bad(f"the server exited with status {status} on SIGTERM")
        self.memory.watch(None)
        targets = self.server.start()
        self.memory.watch(self.server.pid)
        with Client(targets.ipv4, timeout=UNARY_TIMEOUT) as client:
            client.wait_ready(15)
            self.compare(client, before, "after SIGTERM and restart")
        status = self.server.stop()
        if status != 0:
            self.tally.bad(f"the server exited with status {status} on SIGTERM")

    def scan_log(self) -> None:
        text = self.server.log.read_text(errors="replace")
        tracebacks = text.count("Traceback (most recent call last)")
        if tracebacks:
            first = text[text.index("Traceback (most recent call last)") :].splitlines()[:12]
            self.tally.bad("server log: traceback", " | ".join(first))
            for _ in range(tracebacks - 1):
                self.tally.bad("server log: traceback")

    def print_result(self, p99: float, *, aborted: bool = False) -> int:
        """The summary, then the last line; the exit status (1 if a target is missed)."""
        t = self.tally
        args = self.args

        def listed(title: str, counts: Counter[str]) -> str:
            items = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
            return textwrap.fill(
                f"{title} ({sum(counts.values())}): {items or 'none'}",
                width=100,
                subsequent_indent="    ",
                break_on_hyphens=False,
            )

        with t._lock:
            ops = sum(t.ops.values())
            errors = sum(t.unexpected.values()) + (1 if aborted else 0)
            strategies = ", ".join(
                f"{vm.strategy}{''.join(f':{k}={v}' for k, v in vm.options.items())}"
                for vm in self.vms
            )
            lines = [
                textwrap.fill(
                    f"soak: {args.seconds:g} s of load, seed {args.seed}, {args.threads} "
                    f"threads, {len(self.vms)} VMs ({strategies}), {args.idle_streams} idle "
                    "streams",
                    width=100,
                    subsequent_indent="    ",
                ),
                listed("operations answered", t.ops),
                listed("expected refusals by status", t.refusals),
                listed("streams and misbehaving clients", t.notes),
                listed("calls cut by kill -9, by status", t.cut),
                *(textwrap.fill(line, width=100, subsequent_indent="    ") for line in self.report),
            ]
            if t.unexpected:
                lines.append(listed("UNEXPECTED", t.unexpected))
                lines += [f"  e.g. {sample}" for sample in t.samples]
        peak = self.memory.peak_bytes / MIB
        lines.append(f"health checks: {self.health_line}; peak server RSS {peak:.0f} MiB")
        print("\n".join(lines))
        p99_text = "inf" if math.isinf(p99) else f"{p99:.1f}"
        print(
            f"ops={ops} errors_unexpected={errors} health_p99_ms={p99_text} "
            f"lost_vms={self.lost_vms} lost_leaves={self.lost_leaves} stale={self.stale} "
            f"peak_rss_mib={peak:.0f}",
            flush=True,
        )
        failed = errors or self.lost_vms or self.lost_leaves or self.stale
        return 1 if failed or not p99 <= HEALTH_TARGET_MS else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--threads", type=int, default=64, help="client threads")
    parser.add_argument("--idle-streams", type=int, default=256, help="idle Execute streams")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload's choices")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="mean pause of a thread between two steps (0: back to back, saturating the server)",
    )
    parser.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="fraction of the run at which to kill -9 (0: never)",
    )
    parser.add_argument("--snapshot-interval", type=float, default=1.0)
    parser.add_argument("--max-streams", type=int, default=96)
    parser.add_argument("--max-streams-per-client", type=int, default=32)
    parser.add_argument("--stream-idle-timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1 or args.idle_streams < 0:
        parser.error("--seconds must be positive, --threads at least 1, --idle-streams >= 0")
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
