"""Recordings from a real KVM host: ``trace-cmd report`` / ftrace and ``perf script`` text of
the ``kvm:kvm_msr`` and ``kvm:kvm_cr`` tracepoints, imported as traces and exported from them.

The lines are those the kernel prints (Linux arch/x86/kvm/trace.h):

* ``kvm_msr``: ``TP_printk("msr_%s %x = 0x%llx%s", write ? "write" : "read", ecx, data,
  exception ? " (#GP)" : "")`` — ``msr_write 2ff = 0xc06``, ``msr_write 200 = 0x6 (#GP)``;
* ``kvm_cr``: ``TP_printk("cr_%s %x = 0x%lx", rw ? "write" : "read", cr, val)`` —
  ``cr_write 0 = 0x60000010``;
* ``kvm_entry``: ``"vcpu %u, rip 0x%lx"`` and ``kvm_exit``: ``"vcpu %u reason %s…"`` (older
  kernels print ``vcpu %u`` alone, or no vCPU in ``kvm_exit``).

Each line sits behind the tracer's prefix: ``CPU 0/KVM-16856 [007] ....... 380.398696:
kvm_msr: …`` (ftrace and ``trace-cmd report``: thread name, ``-``, pid, host CPU, optional
flags, seconds) or ``CPU 0/KVM 1821753 [015] 4831258.258053: kvm:kvm_msr: …`` (``perf
script``). The vCPU is the ``<n>`` of QEMU's thread name ``CPU <n>/KVM``, else the vCPU of the
last ``kvm_entry``/``kvm_exit`` on the same thread. Only writes of the MTRR MSRs, PAT and CR0
are kept; every other event, header and comment line is skipped. The contract of the import,
the VMM profiles and the burst window are in docs/recordings.md.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.errors import InvalidArgument
from mtrremu.core.events import Burst, Item, VcpuOp, WriteCr0, WriteMsr
from mtrremu.workloads.columns import TraceItems
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.trace import Trace, TraceFormatError, vm_config

FORMATS = ("ftrace", "perf")
VMMS = ("qemu", "none")
#: Writes closer together than this (and from several vCPUs) are replayed as one burst.
DEFAULT_BURST_WINDOW_US = 10
#: Guest RAM when neither a size nor a memslot file is given: the default job's 16 GiB.
DEFAULT_RAM_BYTES = 16 << 30
#: A burst holds at most this many writes; a longer run of close writes is cut into several,
#: so the importer's memory stays bounded whatever the recording holds.
MAX_BURST_WRITES = 4096
#: The MSRs whose writes are kept: the MTRRs and PAT (what decides memory types).
_KEPT_MSRS = frozenset({msrs.PAT, *msrs.MTRR_MSRS})

_FTRACE = re.compile(
    r"\s*(?P<comm>.+?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<msg>.*)"
)
_PERF = re.compile(
    r"\s*(?P<comm>.+?)\s+(?P<pid>\d+)(?:/\d+)?\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+\.\d+):\s+"
    r"(?:\d+\s+)?(?P<system>\w+):(?P<event>\w+):\s?(?P<msg>.*)"
)
_PATTERNS = {"ftrace": _FTRACE, "perf": _PERF}
_MSR = re.compile(
    r"msr_(?P<rw>write|read) (?P<index>[0-9a-f]+) = 0x(?P<value>[0-9a-f]+)(?P<gp> \(#GP\))?\s*"
)
_CR = re.compile(r"cr_(?P<rw>write|read) (?P<index>[0-9a-f]+) = 0x(?P<value>[0-9a-f]+)\s*")
_ENTRY_VCPU = re.compile(r"vcpu (\d+)")
_QEMU_THREAD = re.compile(r"CPU (\d+)/KVM")
#: The events a line claims to be when it names one of them anywhere: such a line must parse.
_CLAIMS = re.compile(r"(?:^|[\s:])(kvm_msr|kvm_cr):")
_EVENTS = frozenset({"kvm_msr", "kvm_cr", "kvm_entry", "kvm_exit"})


@dataclass(frozen=True)
class RecordingOptions:
    """How to turn a recording into a trace (all of it travels with a run, so a run in another
    process imports the file the same way)."""

    #: ``ftrace``, ``perf`` or ``auto`` (the first tracepoint line decides).
    format: str = "auto"
    #: What the VMM did that the tracepoints cannot see: ``qemu`` or ``none``.
    vmm: str = "qemu"
    #: Guest RAM on QEMU's q35 layout, when ``memslots_file`` is not given.
    ram_bytes: int = DEFAULT_RAM_BYTES
    #: A JSON file shaped as a trace header's ``vm`` object (``vcpus`` optional).
    memslots_file: str | None = None
    burst_window_us: int = DEFAULT_BURST_WINDOW_US

    def check(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise InvalidArgument(f"recording format {self.format!r}; known: auto, ftrace, perf")
        if self.vmm not in VMMS:
            raise InvalidArgument(f"VMM profile {self.vmm!r}; known: {', '.join(VMMS)}")
        if self.burst_window_us < 0:
            raise InvalidArgument("the burst window cannot be negative")


@dataclass(frozen=True, slots=True)
class _Write:
    """One kept guest write: when (µs), on which vCPU, and whether the host faulted it."""

    time_us: int
    op: WriteMsr | WriteCr0
    faulted: bool


# -- importing ----------------------------------------------------------------------------


def _open_text(path: Path) -> IO[str]:
    """The file as text, gunzipped when it starts with gzip's magic bytes."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _time_us(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000 + int(fraction[:6].ljust(6, "0"))


def _writes(lines: Iterable[str], source: str, text_format: str) -> Iterator[_Write]:
    """The kept writes of a recording, in order; a line that claims to be a ``kvm_msr`` or
    ``kvm_cr`` event but does not parse raises :class:`TraceFormatError` with its number."""
    chosen = None if text_format == "auto" else _PATTERNS[text_format]
    thread_vcpus: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\n")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        match = None
        for pattern in (_PERF, _FTRACE) if chosen is None else (chosen,):
            found = pattern.fullmatch(text)
            if found is not None and found["event"] in _EVENTS:
                # Auto-detection: the first tracepoint line fixes the format for the rest.
                match, chosen = found, pattern
                break
        if match is None:
            if _CLAIMS.search(text):
                raise TraceFormatError(
                    source,
                    number,
                    "a kvm_msr/kvm_cr line without the tracer's prefix "
                    "(thread-pid [cpu] seconds: event:, or perf script's)",
                )
            continue
        event = match["event"]
        thread = f"{match['comm']}:{match['pid']}"
        if event in ("kvm_entry", "kvm_exit"):
            found = _ENTRY_VCPU.match(match["msg"])
            if found is not None:
                thread_vcpus[thread] = int(found[1])
            continue
        body = (_MSR if event == "kvm_msr" else _CR).fullmatch(match["msg"])
        if body is None:
            raise TraceFormatError(source, number, f"not a {event} message: {match['msg']!r}")
        if body["rw"] == "read":
            continue  # a read changes nothing: not replayed
        index, value = int(body["index"], 16), int(body["value"], 16)
        if value >= 1 << 64 or index >= 1 << 32:
            raise TraceFormatError(source, number, f"{event} value out of range")
        if event == "kvm_msr" and index not in _KEPT_MSRS:
            continue
        if event == "kvm_cr" and index != 0:
            continue
        named = _QEMU_THREAD.search(match["comm"])
        vcpu = int(named[1]) if named is not None else thread_vcpus.get(thread)
        if vcpu is None:
            raise TraceFormatError(
                source,
                number,
                f"cannot tell the vCPU of thread {match['comm']}-"
                f"{match['pid']}: no 'CPU <n>/KVM' name and no kvm_entry/kvm_exit before it",
            )
        op: WriteMsr | WriteCr0 = (
            WriteMsr(vcpu, index, value) if event == "kvm_msr" else WriteCr0(vcpu, value)
        )
        yield _Write(_time_us(match["ts"]), op, event == "kvm_msr" and body["gp"] is not None)


def _grouped(writes: Iterable[_Write], window_us: int, seed: Iterator[int]) -> Iterator[Item]:
    """Writes as items: a run of writes each within ``window_us`` of the one before, from two
    or more vCPUs, becomes one burst (each vCPU's writes, in order, are its lane)."""
    group: list[_Write] = []

    def flush() -> Iterator[Item]:
        lanes: dict[int, list[VcpuOp]] = {}
        for w in group:
            lanes.setdefault(w.op.vcpu, []).append(w.op)
        if len(lanes) < 2:
            yield from (w.op for w in group)
        else:
            yield Burst(tuple((v, tuple(ops)) for v, ops in lanes.items()), next(seed))
        group.clear()

    for write in writes:
        if group and (
            write.time_us - group[-1].time_us > window_us or len(group) >= MAX_BURST_WRITES
        ):
            yield from flush()
        group.append(write)
    if group:
        yield from flush()


def qemu_reset_pushes(vcpus: int) -> Iterator[Item]:
    """What QEMU writes through KVM_SET_SREGS and KVM_SET_MSRS before the guest runs, which
    the tracepoints (guest exits only) never show.

    QEMU (target/i386/kvm/kvm.c) puts every vCPU's registers twice before the first
    instruction: after machine init (``cpu_synchronize_all_post_init``, KVM_PUT_FULL_STATE) and
    on the system reset that follows (``cpu_synchronize_all_post_reset``,
    KVM_PUT_RESET_STATE), one vCPU after another. ``kvm_arch_put_registers`` puts the sregs
    (CR0 = 0x60000010, x86_cpu_reset's value) before the MSRs; ``kvm_put_msrs`` writes PAT
    (x86_cpu_reset: 0x0007040600070406) on every put and, from KVM_PUT_RESET_STATE up, MTRRdefType,
    the 11 fixed-range MSRs and the 8 variable pairs (base then mask), all zero after reset.
    """
    for _ in range(2):
        for vcpu in range(vcpus):
            yield WriteCr0(vcpu, cr0.RESET_VALUE, host=True)
            yield WriteMsr(vcpu, msrs.PAT, msrs.PAT_DEFAULT, host=True)
            for msr in msrs.MTRR_MSRS:
                yield WriteMsr(vcpu, msr, 0, host=True)


def _config(options: RecordingOptions, seen_vcpus: int, source: str) -> VmConfig:
    if options.memslots_file is None:
        # One non-coherent DMA device, as recorded hosts need (docs/recordings.md): without it
        # KVM ignores the guest's MTRRs and nothing is a zap event.
        return VmConfig(
            vcpus=max(seen_vcpus, 1), memslots=q35(options.ram_bytes), noncoherent_dma=1
        )
    path = Path(options.memslots_file)
    try:
        vm: Any = json.loads(path.read_text())
    except OSError as error:
        raise InvalidArgument(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise TraceFormatError(str(path), error.lineno, f"not JSON: {error.msg}") from None
    if isinstance(vm, dict):
        vm.setdefault("vcpus", max(seen_vcpus, 1))
    config = vm_config(vm, str(path))
    if config.vcpus < seen_vcpus:
        raise TraceFormatError(
            source, 1, f"the recording has {seen_vcpus} vCPUs, {path} only {config.vcpus}"
        )
    return config


def load_recording(path: Path, options: RecordingOptions) -> Trace:
    """A recording as a trace: the VMM profile's pushes, then the guest writes (bursts
    grouped), in columns. The file is read twice (the vCPU count first), never held whole.
    ``Trace.host_faults`` holds ``(vcpu, n)`` for each write the host faulted: the ``n``-th
    guest MSR write of that vCPU (from 0)."""
    options.check()
    source = str(path)
    try:
        # First pass: the vCPU count (the VMM's pushes come first) and the host's faults.
        seen = 0
        faults: set[tuple[int, int]] = set()
        msr_writes: Counter[int] = Counter()
        with _open_text(path) as lines:
            for write in _writes(lines, source, options.format):
                vcpu = write.op.vcpu
                seen = max(seen, vcpu + 1)
                if isinstance(write.op, WriteMsr):
                    if write.faulted:
                        faults.add((vcpu, msr_writes[vcpu]))
                    msr_writes[vcpu] += 1
        config = _config(options, seen, source)
        items = TraceItems()
        if options.vmm == "qemu":
            items.extend(qemu_reset_pushes(config.vcpus))
        with _open_text(path) as lines:
            writes = _writes(lines, source, options.format)
            items.extend(_grouped(writes, options.burst_window_us, iter(range(1 << 62))))
    except OSError as error:
        raise InvalidArgument(f"cannot read recording {path}: {error.strerror or error}") from None
    except (EOFError, gzip.BadGzipFile) as error:
        raise InvalidArgument(f"cannot read recording {path}: {error}") from None
    items.seal()
    params = {
        "recording": path.name,
        "vmm": options.vmm,
        "burst_window_us": options.burst_window_us,
        "host_faults": len(faults),
    }
    return Trace(path.stem, config, items, params, host_faults=frozenset(faults))


# -- exporting ----------------------------------------------------------------------------

#: Synthesised time between two exported items, and between two writes inside a burst (µs):
#: far apart and close together against the default burst window.
_ITEM_GAP_US = 1000
_BURST_STEP_US = 1
_START_US = 100_000_000
_PID_BASE = 4000


def _guest_writes(item: Item) -> list[WriteMsr | WriteCr0]:
    """The guest writes of ``item`` a tracepoint would show, in the order they ran (a burst's
    round by round)."""
    if isinstance(item, Burst):
        lanes = [[op for op in ops if _visible(op)] for _, ops in item.lanes]
        depth = max((len(lane) for lane in lanes), default=0)
        return [lane[i] for i in range(depth) for lane in lanes if i < len(lane)]
    return [item] if _visible(item) else []


def _visible(op: object) -> TypeGuard[WriteMsr | WriteCr0]:
    """A guest write of a kept register (host writes and everything else leave no line)."""
    if isinstance(op, WriteCr0):
        return not op.host
    return isinstance(op, WriteMsr) and not op.host and op.msr in _KEPT_MSRS


def export_lines(trace: Trace, text_format: str) -> Iterator[str]:
    """``trace``'s guest MTRR, PAT and CR0 writes as ``text_format`` (``ftrace`` or ``perf``)
    lines, as QEMU's vCPU threads would record them: thread ``CPU <n>/KVM``, pid 4000+n, host
    CPU n, times from 100 s, 1 ms between items and 1 µs between a burst's writes."""
    if text_format not in FORMATS:
        raise InvalidArgument(f"export format {text_format!r}; known: {', '.join(FORMATS)}")
    if text_format == "ftrace":
        yield "# tracer: nop"
        yield "#"
    time_us = _START_US
    for item in trace.items:
        writes = _guest_writes(item)
        for op in writes:
            yield _line(op, time_us, text_format)
            time_us += _BURST_STEP_US
        if writes:
            time_us += _ITEM_GAP_US


def _line(op: WriteMsr | WriteCr0, time_us: int, text_format: str) -> str:
    if isinstance(op, WriteMsr):
        event, message = "kvm_msr", f"msr_write {op.msr:x} = 0x{op.value:x}"
    else:
        event, message = "kvm_cr", f"cr_write 0 = 0x{op.value:x}"
    seconds = f"{time_us // 1_000_000}.{time_us % 1_000_000:06d}"
    thread, pid, cpu = f"CPU {op.vcpu}/KVM", _PID_BASE + op.vcpu, op.vcpu % 1000
    if text_format == "ftrace":
        return f"{thread}-{pid} [{cpu:03d}] ....... {seconds}: {event}: {message}"
    return f"{thread} {pid} [{cpu:03d}] {seconds}: kvm:{event}: {message}"
