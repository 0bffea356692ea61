"""Runs of workloads under strategies, in-process or against a live server, on any Executor.

A :class:`RunSpec` says everything a run depends on (workload or trace file, parameters, VM
overrides, strategy, seed, target); :func:`run` turns it into a record (see :mod:`.records`).
Runs are independent, so :func:`run_all` hands them to a ``concurrent.futures.Executor``: the
caller's choice of ``local:N`` processes or a Dask cluster.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mtrremu.ab.published import ROWS
from mtrremu.ab.records import record
from mtrremu.core.burst import replay
from mtrremu.core.config import Memslot, MemslotKind
from mtrremu.core.errors import BrokenStrategy, InvalidArgument
from mtrremu.core.events import EventResult, ItemResult, Refused, WriteMsr, operation_results
from mtrremu.core.oracle import STALENESS_COUNTS, StalenessLog
from mtrremu.core.strategy import MmuLock
from mtrremu.core.timing import DEFAULT_COSTS, Cycles, ZapCall, round_cycles, rounds_of
from mtrremu.plugin.manager import manager_for
from mtrremu.workloads import build, workload
from mtrremu.workloads.recording import RecordingOptions, load_recording
from mtrremu.workloads.trace import Trace, load

LAYOUTS = ("default", "merged")
#: The default job: the series' two boots (W1 SeaBIOS, W2 OVMF; the cover letter's setups) and
#: the passthrough device unplugged and plugged back in a running guest (W7), so that every kind
#: of memtype event a strategy handles happens in it.
DEFAULT_WORKLOADS = ("W1", "W2", "W7")


def parse_strategy(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:OPTION=VALUE[,OPTION=VALUE]`` (e.g. ``lazy:scope=changed``,
    ``kvm-6.5:events=acrn``): the strategy's name and its options."""
    name, _, rest = text.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise InvalidArgument(f"strategy {text!r}: options are OPTION=VALUE, not {item!r}")
        options[key] = value
    return name, options


@dataclass(frozen=True)
class RunSpec:
    """One run. ``overrides`` are workload parameters; ``vm`` overrides VM flags after the
    trace is built (``quirk_cd_nw_cleared``, ``feature_mtrr``, ``layout``); ``plugins`` are
    plugin modules to load besides the installed ones (``--plugin``); ``strict_trace`` makes any
    refused operation fail the run; with ``recording``, ``trace_file`` is a host recording
    imported with those options (docs/recordings.md)."""

    workload: str
    #: A name, with options if any (see :func:`parse_strategy`).
    strategy: str
    seed: int = 1
    overrides: tuple[tuple[str, Any], ...] = ()
    vm: tuple[tuple[str, Any], ...] = ()
    trace_file: str | None = None
    target: str | None = None
    plugins: tuple[str, ...] = ()
    strict_trace: bool = False
    recording: RecordingOptions | None = None

    @property
    def label(self) -> str:
        """The configuration, for table columns and chart titles."""
        parts = [f"{k}={_short(v)}" for k, v in (*self.overrides, *self.vm)]
        parts.append(f"seed={self.seed}")
        return " ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 30:
        for unit, scale in (("T", 1 << 40), ("G", 1 << 30)):
            if value % scale == 0:
                return f"{value // scale}{unit}"
    return str(value)


def trace_for(spec: RunSpec) -> Trace:
    """The trace a run replays, with the VM overrides applied."""
    if spec.trace_file is not None:
        path = Path(spec.trace_file)
        stat = path.stat() if path.is_file() else None
        if stat is None:
            trace = _read(path, spec.recording)
        else:
            trace = _loaded(str(path), stat.st_mtime_ns, stat.st_size, spec.recording)
    else:
        trace = build(spec.workload, dict(spec.overrides), spec.seed)
    vm = dict(spec.vm)
    layout = vm.pop("layout", "default")
    config = dataclasses.replace(trace.config, track_staleness=True, **vm)
    if layout == "merged":
        config = dataclasses.replace(config, memslots=merged(config.memslots))
    elif layout != "default":
        raise InvalidArgument(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return dataclasses.replace(trace, config=config)


@lru_cache(maxsize=2)
def _loaded(path: str, mtime_ns: int, size: int, recording: RecordingOptions | None) -> Trace:
    """A trace file (or a recording, imported with ``recording``) parsed once for all the runs
    of a job that replay it (the same file as long as its time stamp and size are); traces
    are immutable."""
    return _read(Path(path), recording)


def _read(path: Path, recording: RecordingOptions | None) -> Trace:
    """A trace file, or a recording imported with ``recording``."""
    return load(path) if recording is None else load_recording(path, recording)


def merged(slots: Sequence[Memslot]) -> tuple[Memslot, ...]:
    """One RAM slot spanning every RAM slot (holes filled): a layout where splitting by
    memslot changes nothing. Device slots stay as they are."""
    ram = [s for s in slots if s.kind is MemslotKind.RAM]
    start = min(s.base_gfn for s in ram)
    end = max(s.end_gfn for s in ram)
    devices = tuple(s for s in slots if s.kind is not MemslotKind.RAM)
    for device in devices:
        if device.base_gfn < end and start < device.end_gfn:
            raise InvalidArgument("the merged layout would cover a device memslot")
    return (Memslot(start, end - start, MemslotKind.RAM, "ram-merged"), *devices)


@dataclass
class Replay:
    """What replaying a trace produced, in-process or through a server alike."""

    counters: dict[str, int]
    staleness: dict[str, Any]
    #: Refused operations by their reason (``HOST_WRITE_REJECTED``, ``FAILED_PRECONDITION``…).
    refused: dict[str, int]
    #: The first event the strategy failed on: (hook, error).
    strategy_failure: tuple[str, str] | None
    #: The timing model's cycles for the zap calls, by what ran at the same time.
    cycles: Cycles
    #: For a host recording: guest MSR writes whose outcome differs from the host's
    #: (``count``, and the ``first`` as text); ``None`` for anything else.
    host_disagreements: dict[str, Any] | None = None


def run(spec: RunSpec) -> dict[str, Any]:
    """Run one spec and return its record (JSON-ready).

    Whatever goes wrong inside the replay — a broken strategy, a lost server — becomes a failed
    record (``verdict`` ``"failed"`` with its ``failure``), never an exception: the other runs
    of a job go on and every output is written.
    """
    trace = trace_for(spec)
    registered = manager_for(spec.plugins).strategy(parse_strategy(spec.strategy)[0])
    started = time.perf_counter()
    replay: Replay | None = None
    failure: dict[str, Any] | None
    try:
        lock = registered.spec.mmu_lock
        replay = (
            _replay(spec, trace, lock) if spec.target is None else _replay_remote(spec, trace, lock)
        )
    except BrokenStrategy as error:
        failure = failed("strategy", error.why, hook="factory")
    except Exception as error:
        failure = failed("error", f"{type(error).__name__}: {error}")
    else:
        failure = verdict_failure(replay, spec.strict_trace)
    elapsed = time.perf_counter() - started
    return record(spec, trace, registered, replay, failure, seconds=elapsed)


def failed(kind: str, error: str, *, hook: str | None = None) -> dict[str, Any]:
    """A record's ``failure``: ``kind`` is ``strategy``, ``refusals`` or ``error``."""
    return {"kind": kind, "hook": hook, "error": error}


def verdict_failure(replay: Replay, strict_trace: bool) -> dict[str, Any] | None:
    """Why a replay that finished still failed, if it did."""
    if replay.strategy_failure is not None:
        hook, error = replay.strategy_failure
        return failed("strategy", error, hook=hook)
    if strict_trace and replay.refused:
        listed = ", ".join(f"{n} {reason}" for reason, n in sorted(replay.refused.items()))
        return failed("refusals", f"--strict-trace: refused operations: {listed}")
    return None


class _Fold:
    """What a replay's results add up to, folded one result at a time (a replay of any length
    holds none of them): refusals by reason, the first strategy failure, the modelled cycles,
    and for a host recording, how many guest MSR writes the emulator faulted where the host
    did not or the other way round (a count per vCPU and the first disagreement only)."""

    def __init__(self, lock: MmuLock, host_faults: frozenset[tuple[int, int]] | None) -> None:
        self.lock = lock
        self.refused: Counter[str] = Counter()
        self.first_failure: tuple[str, str] | None = None
        self.cycles = Cycles()
        self.host_faults = host_faults
        self.msr_writes: Counter[int] = Counter()
        self.disagreements = 0
        self.first_disagreement = ""

    def guest_msr_write(self, vcpu: int, msr: int, value: int, faulted: bool) -> None:
        """A guest MSR write's outcome, compared with the host's (recordings only)."""
        assert self.host_faults is not None
        index = self.msr_writes[vcpu]
        self.msr_writes[vcpu] += 1
        host_faulted = (vcpu, index) in self.host_faults
        if faulted != host_faulted:
            self.disagreements += 1
            if not self.first_disagreement:
                self.first_disagreement = (
                    f"vCPU {vcpu} guest MSR write #{index} ({msr:#x} = {value:#x}): "
                    f"host {'#GP' if host_faulted else 'accepted'}, "
                    f"emulator {'#GP' if faulted else 'accepted'}"
                )

    def outcome(self, reason: str | None, failure: tuple[str, str] | None) -> None:
        if reason is not None:
            self.refused[reason] += 1
        elif failure is not None and self.first_failure is None:
            self.first_failure = failure

    def round(self, calls: Sequence[ZapCall]) -> None:
        self.cycles.add(round_cycles(calls, DEFAULT_COSTS, self.lock))

    def result(self, result: ItemResult) -> None:
        """One item's result (a burst's: all its lanes)."""
        ones = (result,) if isinstance(result, EventResult) else operation_results([result])
        for one in ones:
            if isinstance(one, Refused):
                self.outcome(one.reason, None)
                continue
            if one.strategy_failure is not None:
                self.outcome(None, astuple(one.strategy_failure))
            if self.host_faults is not None and isinstance(one.op, WriteMsr) and not one.op.host:
                self.guest_msr_write(one.op.vcpu, one.op.msr, one.op.value, one.gp is not None)
        # An event that counted nothing zapped nothing (the common case): no round to model.
        if not isinstance(result, EventResult) or result.counted:
            for calls in rounds_of([result]):
                self.round(calls)

    def replay(self, counters: dict[str, int], staleness: dict[str, Any]) -> Replay:
        refused = dict(sorted(self.refused.items()))
        disagreements = (
            None
            if self.host_faults is None
            else {"count": self.disagreements, "first": self.first_disagreement or None}
        )
        return Replay(counters, staleness, refused, self.first_failure, self.cycles, disagreements)


def _replay(spec: RunSpec, trace: Trace, lock: MmuLock) -> Replay:
    name, options = parse_strategy(spec.strategy)
    vm = manager_for(spec.plugins).create_vm(trace.config, name, options, vm_id="ab")
    fold = _Fold(lock, trace.host_faults)
    for result in replay(vm, trace.items):
        fold.result(result)
    end = vm.stale_at_quiescence()
    staleness = _staleness(vm.staleness, None if end is None else end.count)
    return fold.replay(vm.counters_snapshot().as_dict(), staleness)


def _replay_remote(spec: RunSpec, trace: Trace, lock: MmuLock) -> Replay:
    from mtrremu import client as rpc  # noqa: PLC0415  (grpc only for runs against a server)
    from mtrremu.rpc import convert  # noqa: PLC0415  (protobuf only for runs against a server)

    assert spec.target is not None
    # Results come back without their operations: a recording's host faults are compared
    # in-process only (the record says null).
    fold = _Fold(lock, None)
    with rpc.Client(spec.target, timeout=600) as connection:
        remote = connection.create_vm(trace.config, *parse_strategy(spec.strategy))
        try:
            messages = (convert.operation_message(item) for item in trace.items)
            # A burst's results share an entry, lane by lane: those at the same lane index
            # ran in one round. Results come in entry order, so one entry is held at a time.
            entry, rounds = -1, dict[int, list[ZapCall]]()
            for result in remote.execute_messages(messages):
                if result.entry != entry:
                    _fold_rounds(fold, rounds)
                    entry, rounds = result.entry, {}
                if result.HasField("error"):
                    fold.outcome(result.error.reason, None)
                    continue
                fold.outcome(None, _remote_failure(result.outcome))
                call = ZapCall.of(convert.counters(result.outcome.counters))
                if call is not None:
                    index = result.lane.index if result.HasField("lane") else -1
                    rounds.setdefault(index, []).append(call)
            _fold_rounds(fold, rounds)
            counters = remote.counters().as_dict()
            report = remote.staleness(at_quiescence=True)
        finally:
            remote.delete()
    at_end = report.stale_leaves if report.HasField("stale_leaves") else None
    return fold.replay(counters, _staleness(report.tracking, at_end))


def _fold_rounds(fold: _Fold, rounds: dict[int, list[ZapCall]]) -> None:
    for calls in rounds.values():
        fold.round(calls)


def _remote_failure(outcome: Any) -> tuple[str, str] | None:
    if not outcome.HasField("strategy_failure"):
        return None
    return (outcome.strategy_failure.hook, outcome.strategy_failure.error)


def _staleness(log: StalenessLog | Any, at_end: int | None) -> dict[str, Any]:
    """A record's ``staleness`` from the VM's log, in-process or its message form (the two
    share their field names)."""
    found: dict[str, Any] = {name: int(getattr(log, name)) for name in STALENESS_COUNTS}
    found["excused"] = dict(sorted(log.excused.items()))
    found["first_stale_event"] = log.first_stale_event
    found["at_end"] = at_end
    return found


# -- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The cross product a command line asks for."""

    workloads: Sequence[str] = DEFAULT_WORKLOADS
    strategies: Sequence[str] = ()
    seeds: Sequence[int] = (1,)
    vcpus: Sequence[int] = ()
    memory: Sequence[int] = ()
    quirk: Sequence[bool] = ()
    feature_mtrr: Sequence[bool] = ()
    layouts: Sequence[str] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    traces: Sequence[str] = ()
    #: Host recordings, imported with ``recording`` (``memory`` gives their RAM when set).
    recordings: Sequence[str] = ()
    recording: RecordingOptions = field(default_factory=RecordingOptions)
    plugins: tuple[str, ...] = ()
    strict_trace: bool = False

    def specs(self) -> list[RunSpec]:
        axes: list[list[tuple[str, Any]]] = [
            [("vcpus", v) for v in self.vcpus],
            [("ram", m) for m in self.memory],
        ]
        vm_axes: list[list[tuple[str, Any]]] = [
            [("quirk_cd_nw_cleared", q) for q in self.quirk],
            [("feature_mtrr", f) for f in self.feature_mtrr],
            [("layout", layout) for layout in self.layouts],
        ]
        configs = list(itertools.product(*(_or_none(axis) for axis in axes)))
        vm_configs = list(itertools.product(*(_or_none(axis) for axis in vm_axes)))
        for strategy in self.strategies:
            # Unknown names and options fail before anything runs.
            manager_for(self.plugins).check_options(*parse_strategy(strategy))
        specs = []
        self.recording.check()
        sources = [(w, None) for w in self.workloads] + [("trace", t) for t in self.traces]
        sources += [("recording", r) for r in self.recordings]
        for (name, trace_file), config, vm_config, seed, strategy in itertools.product(
            sources, configs, vm_configs, self.seeds, self.strategies
        ):
            overrides = [kv for kv in config if kv is not None]
            recording = None
            if trace_file is None:
                workload(name)  # unknown names fail before anything runs
                overrides += list(self.params.items())
            elif name == "recording":
                recording = self.recording
                ram = dict(overrides).get("ram")
                others = {key for key, _ in overrides} - {"ram"}
                if self.params or others or (ram is not None and recording.memslots_file):
                    raise InvalidArgument(
                        "only --memory applies to --recording files, and not with --memslots"
                    )
                if ram is not None:
                    recording = dataclasses.replace(recording, ram_bytes=ram)
            elif overrides or self.params:
                raise InvalidArgument("--vcpus, --memory and --param do not apply to --trace files")
            specs.append(
                RunSpec(
                    workload=name if trace_file is None else Path(trace_file).stem,
                    strategy=strategy,
                    seed=seed,
                    overrides=tuple(overrides),
                    vm=tuple(kv for kv in vm_config if kv is not None),
                    trace_file=trace_file,
                    plugins=self.plugins,
                    strict_trace=self.strict_trace,
                    recording=recording,
                )
            )
        return specs


def _or_none(axis: list[tuple[str, Any]]) -> list[tuple[str, Any] | None]:
    """An axis, or one "not varied" point."""
    return list(axis) if axis else [None]


#: Our own strategies, compared with the series in the default job.
EXPERIMENTS = ("precise", "lazy", "lazy:scope=changed")


#: The ``-s`` value that stands for every registered strategy.
ALL = "all"


def default_strategies(plugins: tuple[str, ...] = ()) -> list[str]:
    """The series' rows and our experimental strategies, then those of the plugin modules
    ``plugins`` (``--plugin``). Installed third-party strategies are not in it: they join with
    ``-s all`` and are always selectable by name, so installing a plugin never changes the
    default job."""
    extras = [s.name for s in manager_for(plugins).strategies() if s.plugin in plugins]
    return [*ROWS, *EXPERIMENTS, *extras]


def chosen_strategies(requested: Sequence[str], plugins: tuple[str, ...] = ()) -> list[str]:
    """The strategies ``-s`` asks for, in order and without repeats: none given is
    :func:`default_strategies`; :data:`ALL` is the default set followed by every other
    registered strategy (built-in or installed), by name."""
    if not requested:
        return default_strategies(plugins)
    chosen: list[str] = []
    for item in requested:
        if item != ALL:
            chosen.append(item)
            continue
        defaults = default_strategies(plugins)
        chosen += [*defaults, *(s.name for s in manager_for(plugins).strategies())]
    return list(dict.fromkeys(chosen))


# -- executing ------------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each submission at once in this process (the default: no process start-up)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


@contextmanager
def executor_for(text: str | None) -> Iterator[Executor]:
    """``None``: inline; ``local:N``: N worker processes; ``dask://host:port``: a Dask cluster
    (needs the ``dask`` extra)."""
    if not text:
        yield InlineExecutor()
        return
    if text.startswith("local:"):
        try:
            workers = int(text[6:])
        except ValueError:
            raise InvalidArgument(f"--executor {text!r}: local:N needs a number") from None
        if workers < 1:
            raise InvalidArgument("--executor local:N needs N >= 1")
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield pool
        return
    if text.startswith("dask://"):
        try:
            from distributed import Client as DaskClient  # noqa: PLC0415  (optional extra)
        except ImportError:
            raise InvalidArgument(
                "--executor dask:// needs the dask extra: pip install 'mtrremu[dask]'"
            ) from None
        factory: Any = DaskClient  # untyped library
        client = factory(text[len("dask://") :])
        try:
            yield client.get_executor()
        finally:
            client.close()
        return
    raise InvalidArgument(f"--executor {text!r}: expected local:N or dask://host:port")


def run_all(
    specs: Sequence[RunSpec],
    executor: Executor,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every spec's record, in spec order (whatever order they finish in)."""
    futures = {executor.submit(run, spec): index for index, spec in enumerate(specs)}
    records: list[dict[str, Any] | None] = [None] * len(specs)
    for future in as_completed(futures):
        done = future.result()
        records[futures[future]] = done
        if on_done is not None:
            on_done(done)
    return [r for r in records if r is not None]


# -- a server of our own ---------------------------------------------------------------------


@contextmanager
def spawned_server(plugins: Sequence[str] = ()) -> Iterator[str]:
    """Start ``mtrremu serve`` (with the plugin modules ``plugins``) on a unix socket in a
    temporary directory; stop it after."""
    flags = [arg for module in plugins for arg in ("--plugin", module)]
    with (
        tempfile.TemporaryDirectory(prefix="mtrremu-ab-") as folder,
        server_process(Path(folder), *flags) as (_, target),
    ):
        yield target


@contextmanager
def server_process(folder: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``mtrremu serve FLAGS`` as a process of its own on a unix socket in ``folder``, once it
    answers; stopped after (SIGTERM) unless it already ended."""
    from mtrremu.client import Client  # noqa: PLC0415  (grpc only for runs against a server)

    target = f"unix:{folder / 'server.sock'}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrremu",
            "serve",
            "--listen",
            target,
            "--log-level",
            "warning",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        with Client(target) as probe:
            probe.wait_ready(timeout=60)
        yield process, target
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(30)
