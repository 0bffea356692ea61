"""Shared test helpers: VMs built through the real plugin manager, MTRR programming shortcuts."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor

from mtrremu.core import events
from mtrremu.core.config import MemslotKind, VmConfig
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import GIB, KIB, MIB, Level
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager
from mtrremu.server.app import EmulatorServer, ServerSettings
from mtrremu.server.interceptor import RateLimit
from mtrremu.testing.cases import CD0 as CD0  # noqa: PLC0414 (re-export)
from mtrremu.testing.cases import CD1 as CD1  # noqa: PLC0414 (re-export)
from mtrremu.testing.cases import q35_slots as q35_slots  # noqa: PLC0414 (re-export)
from mtrremu.testing.cases import set_deftype as set_deftype  # noqa: PLC0414 (re-export)
from mtrremu.testing.cases import set_fixed_all as set_fixed_all  # noqa: PLC0414 (re-export)
from mtrremu.testing.cases import set_var as set_var  # noqa: PLC0414 (re-export)
from mtrremu.testing.cases import var_mask as var_mask  # noqa: PLC0414 (re-export)

#: The test profile (see ``tests/conftest.py``): ``quick`` unless ``MTRREMU_TEST_PROFILE=ci``.
PROFILE = os.environ.get("MTRREMU_TEST_PROFILE", "quick")
if PROFILE not in ("quick", "ci"):
    raise SystemExit(f"MTRREMU_TEST_PROFILE must be quick or ci, not {PROFILE!r}")

#: The built-in strategies that reproduce KVM (released kernels and the series).
FAITHFUL = (
    "kvm-6.5",
    "kvm-6.7",
    "kvm-6.11",
    "zap-all",
    "zap-all-serialized",
    "fine-grained",
    "fine-grained-split",
)
#: The series' rows with patch 12 (zaps under the MMU lock held for read).
SHARED = ("zap-all-shared", "fine-grained-shared", "fine-grained-split-shared")
#: Strategies of our own that declare no gap: the oracle holds them to every event.
EXPERIMENTAL = ("precise", "lazy")
ALL_STRATEGIES = FAITHFUL + SHARED + EXPERIMENTAL
SERIES = ("zap-all", "zap-all-serialized", "fine-grained", "fine-grained-split")

_MANAGER = PluginManager(entry_points=False)


def create_vm(config: VmConfig, strategy: str) -> Vm:
    """A VM built by the real plugin manager (built-in strategies only)."""
    return _MANAGER.create_vm(config, strategy)


def make_vm(strategy: str = "fine-grained", **config: object) -> Vm:
    """A VM with one non-coherent DMA device attached at creation unless told otherwise."""
    config.setdefault("noncoherent_dma", 1)
    return create_vm(VmConfig(**config), strategy)  # type: ignore[arg-type]


def programmed(strategy: str, vcpus: int, fixed: MemType = MemType.WB) -> Vm:
    """Every vCPU: ``fixed`` below 1 MiB, UC over [3 GiB, 4 GiB), WT over [2 GiB, 2 GiB + 256
    MiB), WB default; then vCPU 0 faults [0, 4 GiB)."""
    vm = make_vm(strategy, vcpus=vcpus)
    for vcpu in range(vcpus):
        set_fixed_all(vm, vcpu, fixed)
        set_var(vm, vcpu, 0, 3 * GIB, GIB, MemType.UC)
        set_var(vm, vcpu, 1, 2 * GIB, 256 * MIB, MemType.WT)
        set_deftype(vm, vcpu, 0xC06)
    vm.fault_range(0, 0, 4 * GIB)
    return vm


def mapping(result: events.EventResult) -> events.Mapping:
    """The leaf an access was served by (it must have been served by one)."""
    assert result.access is not None and result.access.mapping is not None
    return result.access.mapping


def leaves(vm: Vm) -> list[tuple[int, int, int]]:
    """Every present leaf as ``(base gfn, level, byte)``, sorted."""
    return sorted(
        (int(g), int(level), int(b))
        for level, gfns, bytes_ in vm.store.leaves()
        for g, b in zip(gfns, bytes_, strict=True)
    )


def gfn(gpa: int) -> int:
    """The guest frame number holding byte address ``gpa``."""
    return gpa >> 12


def gpa(gfn: int) -> int:
    """The byte address of the first byte of guest frame ``gfn``."""
    return gfn << 12


__all__ = [
    "ALL_STRATEGIES",
    "EXPERIMENTAL",
    "FAITHFUL",
    "SHARED",
    "CD0",
    "CD1",
    "GIB",
    "KIB",
    "MIB",
    "SERIES",
    "Level",
    "MemslotKind",
    "create_vm",
    "gfn",
    "gpa",
    "leaves",
    "make_vm",
    "mapping",
    "programmed",
    "q35_slots",
    "set_deftype",
    "set_fixed_all",
    "set_var",
    "var_mask",
]


ROOT = Path(__file__).resolve().parents[1]


def run_command(
    *command: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a real subprocess from the repository root, capturing its text output; the caller
    checks the exit status."""
    return subprocess.run(
        list(command),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def run_mtrremu(
    *args: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``mtrremu ARGS`` through this interpreter."""
    return run_command(sys.executable, "-m", "mtrremu.cli", *args, timeout=timeout, env=env)


def run_ab(
    *args: str, out: Path, charts: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``mtrremu ab ARGS --out OUT --no-progress`` (and ``--no-charts`` unless asked)."""
    flags = ["--out", str(out), "--no-progress"] + ([] if charts else ["--no-charts"])
    return run_mtrremu("ab", *args, *flags, timeout=timeout)


def require_node_toolchain(*needed: Path) -> str:
    """The ``node`` executable, once every path in ``needed`` (under clients/node) exists; skip
    without them, or fail with ``MTRREMU_REQUIRE_NODE=1`` (CI)."""
    node = shutil.which("node")
    missing = [] if node is not None else ["`node` is not on PATH"]
    missing += [
        f"{path.relative_to(ROOT)} is missing (run `npm ci --prefix clients/node`)"
        for path in needed
        if not path.exists()
    ]
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("MTRREMU_REQUIRE_NODE") == "1":
            pytest.fail(f"MTRREMU_REQUIRE_NODE=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    assert node is not None
    return node


@contextmanager
def serving(*listen: str, **settings: Any) -> Iterator[EmulatorServer]:
    """A started in-process server on ``listen`` (default ``127.0.0.1:0``), stopped on exit."""
    server = EmulatorServer(ServerSettings(listen=listen or ("127.0.0.1:0",), **settings))
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


def run_threads(count: int, body: Callable[[int], None], timeout: float = 30.0) -> None:
    """Run ``body(0)`` .. ``body(count - 1)`` on their own threads; re-raise the first error and
    fail if a thread is still running after ``timeout``."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            body(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a vCPU thread never returned (deadlock?)"
    if errors:
        raise errors[0]


class _Collect(logging.Handler):
    """Keeps the records of the server's and gRPC's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("mtrremu", "grpc")):
            self.records.append(record)


@contextmanager
def server_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the server's and gRPC's loggers emit meanwhile, at level INFO and up, in
    order. Their rate limit is lifted meanwhile, so that each line is counted."""
    handler = _Collect()
    limits = [
        limit
        for name in ("mtrremu.server", "grpc._server")
        for limit in logging.getLogger(name).filters
        if isinstance(limit, RateLimit)
    ]
    rates = [limit.per_second for limit in limits]
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO if level > logging.INFO else level)
    for limit in limits:
        limit.per_second = 1_000_000
    try:
        yield handler.records
    finally:
        for limit, rate in zip(limits, rates, strict=True):
            limit.per_second = rate
        root.setLevel(level)
        root.removeHandler(handler)


@dataclass(frozen=True)
class RawAnswer:
    """How a call sent as raw bytes ended: its status, and the responses as raw bytes."""

    code: grpc.StatusCode
    details: str
    #: Text values, bytes for the ``-bin`` keys.
    trailers: Mapping[str, str | bytes]
    responses: list[bytes]


def call_raw(
    channel: grpc.Channel, method: MethodDescriptor, requests: list[bytes], timeout: float = 10.0
) -> RawAnswer:
    """Call ``method`` with ``requests`` as they are, no serializer either way (a method taking
    one request gets the first); one call of any of the four kinds."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    responses: list[bytes]
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, None, None)
            responses = list(call(iter(requests), timeout=timeout))
        elif method.client_streaming:
            responses = [channel.stream_unary(path, None, None)(iter(requests), timeout=timeout)]
        elif method.server_streaming:
            responses = list(channel.unary_stream(path, None, None)(requests[0], timeout=timeout))
        else:
            responses = [channel.unary_unary(path, None, None)(requests[0], timeout=timeout)]
    except grpc.RpcError as error:
        trailers = {item.key: item.value for item in error.trailing_metadata() or ()}
        return RawAnswer(error.code(), error.details() or "", trailers, [])
    return RawAnswer(grpc.StatusCode.OK, "", {}, responses)
