"""The ``mtrremu`` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mtrremu.ab.published import ROWS
from mtrremu.ab.report import print_report, write_charts, write_csv, write_jsonl
from mtrremu.ab.runner import (
    DEFAULT_WORKLOADS,
    EXPERIMENTS,
    LAYOUTS,
    Plan,
    chosen_strategies,
    executor_for,
    run_all,
    spawned_server,
    trace_for,
)
from mtrremu.core.errors import InvalidArgument, MtrremuError
from mtrremu.core.units import SIZE_SUFFIXES
from mtrremu.plugin.manager import (
    BLOCK_ENV,
    ONLY_ENV,
    TRACE_ENV,
    PluginSelection,
    default_manager,
)
from mtrremu.rpc.transport import Tls
from mtrremu.server.clients import Clients
from mtrremu.server.fairness import StreamLimits
from mtrremu.server.limits import Limits
from mtrremu.snapshot import read_snapshot
from mtrremu.workloads import WORKLOADS, build
from mtrremu.workloads.recording import (
    DEFAULT_BURST_WINDOW_US,
    FORMATS,
    VMMS,
    RecordingOptions,
    export_lines,
)
from mtrremu.workloads.trace import load, save

if TYPE_CHECKING:
    from mtrremu.client import Client


#: ``mtrremu strategies --strict``'s exit status when a plugin was not loaded.
EXIT_PLUGIN_FAULT = 1


def _strategies(args: argparse.Namespace) -> int:
    manager = default_manager()
    for registered in manager.strategies():
        spec = registered.spec
        print(
            f"{spec.name:<20} profile {spec.profile.value:<5} "
            f"{registered.distribution} {registered.version} ({registered.plugin})"
        )
        print(f"{'':<20} {spec.description}")
    if manager.faults:
        print(f"\nnot loaded ({len(manager.faults)}):")
        for fault in manager.faults:
            print(f"  {fault.error}")
    if manager.skipped:
        print(f"\nskipped ({len(manager.skipped)}):")
        for skipped in manager.skipped:
            print(
                f"  plugin {skipped.plugin!r} ({skipped.distribution} {skipped.version}): "
                f"{skipped.why}"
            )
    return EXIT_PLUGIN_FAULT if args.strict and manager.faults else 0


def _add_plugin_options(parser: argparse.ArgumentParser) -> None:
    """The options selecting installed plugins and tracing hook calls (docs/plugin-loading.md);
    :func:`_select_plugins` applies them."""
    parser.add_argument(
        "--block-plugin",
        action="append",
        metavar="DIST",
        help=f"do not load the installed plugins of distribution DIST (repeatable; adds to "
        f"${BLOCK_ENV})",
    )
    parser.add_argument(
        "--only-plugins",
        metavar="DIST,...",
        help=f"load only these installed plugin distributions besides the built-ins "
        f"(replaces ${ONLY_ENV}; '' loads none)",
    )
    parser.add_argument(
        "--trace-hooks",
        action="store_true",
        help=f"log every plugin hook call with its arguments and outcome (or ${TRACE_ENV}=1)",
    )


def _select_plugins(args: argparse.Namespace) -> None:
    """Apply ``--block-plugin``, ``--only-plugins`` and ``--trace-hooks`` by setting their
    environment variables, so every process the command starts (``--executor local:N``
    workers, a ``--target spawn`` server) selects the same plugins; a bad selection (blocking
    the built-ins) fails here."""
    if args.block_plugin:
        blocked = [n for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()]
        os.environ[BLOCK_ENV] = ",".join([*blocked, *args.block_plugin])
    if args.only_plugins is not None:
        os.environ[ONLY_ENV] = args.only_plugins
    if args.trace_hooks:
        os.environ[TRACE_ENV] = "1"
    PluginSelection.from_environment()


_SUFFIXES = {"": 1, **SIZE_SUFFIXES}


def _size(text: str) -> int:
    """A byte count: a number with an optional K, M, G or T suffix (powers of 1024)."""
    number, suffix = text.rstrip("KMGTkmgtiIbB"), text[len(text.rstrip("KMGTkmgtiIbB")) :]
    scale = _SUFFIXES.get(suffix.upper().rstrip("IB")[:1])
    if scale is None or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64G or 16T")
    return int(number) * scale


def _size_text(count: int) -> str:
    """``count`` bytes the way :func:`_size` reads them, with the largest exact suffix."""
    for suffix, scale in sorted(SIZE_SUFFIXES.items(), key=lambda item: -item[1]):
        if count and count % scale == 0:
            return f"{count // scale}{suffix}"
    return str(count)


def _serve(args: argparse.Namespace) -> int:
    # grpc loads only for the command that serves.
    from mtrremu.server.app import DEFAULT_LISTEN, ServerSettings, serve  # noqa: PLC0415
    from mtrremu.server.state_dir import StateDirSettings  # noqa: PLC0415

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits = Limits(
        max_vms=args.max_vms,
        max_vm_memory_bytes=args.max_vm_memory,
        max_total_memory_bytes=args.max_total_memory,
        max_batch_operations=args.max_batch_operations,
        max_message_bytes=args.max_message_bytes,
        max_snapshot_bytes=args.max_snapshot_size,
    )
    key = _read(args.snapshot_key_file) if args.snapshot_key_file else None
    settings = ServerSettings(
        listen=tuple(args.listen or [DEFAULT_LISTEN]),
        limits=limits,
        max_workers=args.max_workers,
        grace_seconds=args.grace,
        plugins=tuple(args.plugin or ()),
        reflection=not args.no_reflection,
        tls=_tls(args),
        clients=(
            Clients.parse(_read(args.token_file).decode(errors="replace"), args.token_file)
            if args.token_file
            else None
        ),
        streams=StreamLimits(
            max_streams=args.max_streams,
            max_streams_per_client=args.max_streams_per_client,
            stream_idle_seconds=args.stream_idle_timeout,
        ),
        state_dir=(
            StateDirSettings(Path(args.state_dir), args.snapshot_interval, key)
            if args.state_dir
            else None
        ),
        snapshot_key=key,
    )
    serve(settings, announce=["mtrremu: serving on {addresses}"])
    return 0


def _tls(args: argparse.Namespace) -> Tls | None:
    """The server's TLS material from ``--tls-*``, or None; a half-given pair is an error."""
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise InvalidArgument("--tls-cert and --tls-key go together")

    return Tls(
        _read(args.tls_cert),
        _read(args.tls_key),
        _read(args.tls_client_ca) if args.tls_client_ca else None,
    )


def _token(path: str | None) -> str | None:
    """A client's token from its token file: the first client line (``NAME TOKEN`` or
    ``TOKEN``, as the server's file has them)."""
    if path is None:
        return None
    clients = Clients.parse(_read(path).decode(errors="replace"), path)
    return next(iter(clients.by_token)).decode()


def _read(path: str) -> bytes:
    with _open(path) as source:
        return source.read()


def _client(args: argparse.Namespace) -> Client:
    """A client of ``--server`` with the command's TLS material and token."""
    # grpc loads only for the commands that talk to a server.
    from mtrremu.client import Client  # noqa: PLC0415

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        tls = Tls(
            _read(args.tls_cert) if args.tls_cert else None,
            _read(args.tls_key) if args.tls_key else None,
            _read(args.tls_ca) if args.tls_ca else None,
        )
    return Client(args.server, tls=tls, token=_token(args.token_file))


def _snapshot_export(args: argparse.Namespace) -> int:
    out = Path(args.file)
    with _client(args) as client, open(out, "wb") as target:
        size = client.vm(args.vm_id).export_to(target)
    print(f"VM {args.vm_id}: {size} bytes written to {out}")
    return 0


def _snapshot_import(args: argparse.Namespace) -> int:
    with _client(args) as client, _open(args.file) as source:
        vm = client.import_vm(source)
    print(vm.vm_id)
    return 0


def _snapshot_check(args: argparse.Namespace) -> int:
    key = _read(args.key_file) if args.key_file else None
    with _open(args.file) as source:
        state = read_snapshot(source, key)
    config = state.config
    print(f"{args.file}: a valid snapshot of VM {state.vm_id}")
    print(
        f"  strategy {state.strategy} {dict(state.options) or ''}".rstrip()
        + f", {config.vcpus} vCPUs, {_size_text(config.memory_pages << 12)} of guest memory "
        f"in {len(config.memslots)} memslots"
    )
    print(f"  {state.leaf_total} present leaves, counters: {state.counters.as_dict()}")
    return 0


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise InvalidArgument(f"cannot read {path}: {error.strerror}") from None


def _switch(text: str) -> bool:
    if text in ("on", "off"):
        return text == "on"
    raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


#: ``mtrremu ab``'s exit statuses (also in its ``--help``).
EXIT_CLEAN, EXIT_STALE, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
AB_EXIT_STATUSES = f"""exit status:
  {EXIT_CLEAN}  every run finished and the oracle found no stale leaf
  {EXIT_STALE}  some run left stale leaves (STALE; --allow-stale makes this {EXIT_CLEAN})
  {EXIT_USAGE}  the command line or an input was wrong (unknown workload, strategy or plugin
     module, malformed trace file); nothing ran
  {EXIT_FAILED}  some run FAILED: its strategy raised or returned something other than a
     decision, its factory was broken, --strict-trace saw a refused operation, or the
     server went away; the other runs finished and every output was written"""


def _ab(args: argparse.Namespace) -> int:
    console = Console()
    if console.width < 120:  # a pipe or a narrow terminal: keep the table readable
        console = Console(width=120)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plugins = tuple(args.plugin or ())
    plan = Plan(
        workloads=args.workload
        or ([] if args.trace or args.recording else list(DEFAULT_WORKLOADS)),
        strategies=chosen_strategies(args.strategy or [], plugins),
        seeds=args.seed or [1],
        vcpus=args.vcpus or [],
        memory=args.memory or [],
        quirk=args.quirk or [],
        feature_mtrr=args.feature_mtrr or [],
        layouts=args.layout or [],
        params=dict(args.param or []),
        traces=args.trace or [],
        recordings=args.recording or [],
        recording=RecordingOptions(
            format=args.recording_format,
            vmm=args.vmm,
            memslots_file=args.memslots,
            burst_window_us=args.burst_window_us,
        ),
        plugins=plugins,
        strict_trace=args.strict_trace,
    )
    planned = plan.specs()
    if args.save_traces:
        folder = Path(args.save_traces)
        folder.mkdir(parents=True, exist_ok=True)
        for spec in {(s.workload, s.overrides, s.seed, s.trace_file): s for s in planned}.values():
            trace = trace_for(spec)
            name = f"{spec.workload}-{spec.label.replace(' ', '_').replace('=', '-')}.jsonl"
            save(trace, folder / name)
        console.print(f"traces written to {folder}/")
    with contextlib.ExitStack() as stack:
        target = args.target
        if target == "spawn":
            target = stack.enter_context(spawned_server(plugins))
            console.print(f"started a server on {target}")
        specs = [dataclasses.replace(s, target=target) for s in planned]
        executor = stack.enter_context(executor_for(args.executor))
        progress = stack.enter_context(
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                disable=args.no_progress,
            )
        )
        task = progress.add_task("replaying", total=len(specs))
        records = run_all(
            specs,
            executor,
            on_done=lambda r: progress.update(
                task, advance=1, description=f"{r['workload']} {r['strategy']}"
            ),
        )
    print_report(records, console)
    jsonl, csv_path = out / "ab.jsonl", out / "ab.csv"
    write_jsonl(records, jsonl)
    write_csv(records, csv_path)
    console.print(f"JSON Lines: {jsonl}")
    console.print(f"CSV:        {csv_path}")
    if not args.no_charts:
        charts = write_charts(records, out / "charts")
        console.print(f"charts:     {out / 'charts'}/ ({len(charts)} PNG)")
    verdicts = Counter(r["verdict"] for r in records)
    if verdicts["failed"]:
        code = EXIT_FAILED
    elif verdicts["stale"] and not args.allow_stale:
        code = EXIT_STALE
    else:
        code = EXIT_CLEAN
    for done in records:
        found = done.get("host_disagreements")
        if found and found["count"]:
            console.print(
                f"host faults: {done['workload']} {done['strategy']}: {found['count']} guest "
                f"MSR writes faulted differently from the recording; first: {found['first']}"
            )
    summary = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    console.print(f"verdict:    {len(records)} runs: {summary} (exit status {code})")
    return code


def _export(args: argparse.Namespace) -> int:
    if args.workload is not None:
        trace = build(args.workload, dict(args.param or []), args.seed)
    elif args.param:
        raise InvalidArgument("--param applies to workloads only")
    else:
        trace = load(Path(args.trace))
    with contextlib.ExitStack() as stack:
        out = sys.stdout if args.out is None else stack.enter_context(Path(args.out).open("w"))
        for line in export_lines(trace, args.format):
            out.write(line + "\n")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default once: from the help text when it names one, else appended
    (options whose default is "not given" show none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


_PLUGIN_HELP = (
    "import path of a plugin module to load besides the installed plugins (repeatable), "
    "e.g. mtrremu.testing.mutants"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtrremu",
        description="Emulate how Linux KVM on Intel EPT picks guest memory types and zaps.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser(
        "strategies",
        help="list the installed zap strategies and the plugins that could not be loaded",
        description="List every strategy (name, memtype profile, distribution, version and "
        "plugin), then the plugins that were not loaded and why, then those the plugin "
        "selection skipped (docs/plugin-loading.md).",
        epilog=f"exit status: 0, or {EXIT_PLUGIN_FAULT} with --strict if a plugin was not "
        "loaded; 2 for a bad selection",
    )
    listing.add_argument(
        "--strict",
        action="store_true",
        help=f"exit {EXIT_PLUGIN_FAULT} if any plugin could not be loaded",
    )
    _add_plugin_options(listing)
    listing.set_defaults(run=_strategies)
    defaults = Limits()
    streams = StreamLimits()
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server (mtrremu.v1)",
        description="Serve mtrremu.v1 with health checking and reflection until SIGINT/SIGTERM.",
        epilog="SIZE is a byte count with an optional K, M, G or T suffix (powers of 1024). "
        "Every limit, status and reason is described in docs/api.md.",
        formatter_class=_Help,
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="host:port or unix:/path (repeatable; default 127.0.0.1:50051)",
    )
    serve.add_argument(
        "--max-vms",
        type=int,
        default=defaults.max_vms,
        metavar="N",
        help="VMs held at once; CreateVm beyond it is RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--max-vm-memory",
        type=_size,
        default=defaults.max_vm_memory_bytes,
        metavar="SIZE",
        help="guest memory (RAM and device memslots) of one VM; the EPT costs at most about a "
        f"byte per 4 KiB of it (default: {_size_text(defaults.max_vm_memory_bytes)})",
    )
    serve.add_argument(
        "--max-total-memory",
        type=_size,
        default=defaults.max_total_memory_bytes,
        metavar="SIZE",
        help="guest memory of all VMs together "
        f"(default: {_size_text(defaults.max_total_memory_bytes)})",
    )
    serve.add_argument(
        "--max-batch-operations",
        type=int,
        default=defaults.max_batch_operations,
        metavar="N",
        help="operations in one Execute batch, each operation of a burst counted",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=_size,
        default=defaults.max_message_bytes,
        metavar="SIZE",
        help="largest request message; replies never exceed 4 MiB "
        f"(default: {_size_text(defaults.max_message_bytes)})",
    )
    serve.add_argument(
        "--max-workers",
        type=int,
        default=256,
        metavar="N",
        help="server threads: calls served at once",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time in-flight calls get to finish at shutdown",
    )
    serve.add_argument(
        "--max-streams",
        type=int,
        default=streams.max_streams,
        metavar="N",
        help="Execute and DumpLeaves streams running at once; the worker threads beyond them "
        "stay free for unary calls and health checks (must be below --max-workers)",
    )
    serve.add_argument(
        "--max-streams-per-client",
        type=int,
        default=streams.max_streams_per_client,
        metavar="N",
        help="streams one client (host address; all unix-socket clients are one) runs at once",
    )
    serve.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=streams.stream_idle_seconds,
        metavar="SECONDS",
        help="a stream with no request and no work for this long is cancelled",
    )
    serve.add_argument("--plugin", action="append", metavar="MODULE", help=_PLUGIN_HELP)
    _add_plugin_options(serve)
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain: serve TCP addresses over TLS (with --tls-key)",
    )
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA: require every client to present a certificate it signed",
    )
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="require every call but health checks to carry 'authorization: Bearer <token>' "
        "of a client in FILE (lines 'NAME TOKEN', or 'TOKEN' for client 'default'); each "
        "client sees and uses only its own VMs (use with TLS off loopback)",
    )
    serve.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep every VM as a snapshot file in DIR: written atomically every "
        "--snapshot-interval (the VMs that changed) and at shutdown, restored at start",
    )
    serve.add_argument(
        "--snapshot-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between two rounds of snapshots into --state-dir",
    )
    serve.add_argument(
        "--snapshot-key-file",
        metavar="FILE",
        help="sign snapshots (exported and in --state-dir) with HMAC-SHA-256 under the key "
        "in FILE, and refuse snapshots that do not carry that signature",
    )
    serve.add_argument(
        "--max-snapshot-size",
        type=_size,
        default=defaults.max_snapshot_bytes,
        metavar="SIZE",
        help="largest snapshot ImportVm accepts "
        f"(default: {_size_text(defaults.max_snapshot_bytes)})",
    )
    serve.add_argument(
        "--no-reflection",
        action="store_true",
        help="do not serve gRPC server reflection (it lists the services to any client)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="log detail"
    )
    serve.set_defaults(run=_serve)

    _add_snapshot_commands(commands)

    export = commands.add_parser(
        "export",
        help="write a workload or trace as a host recording would show it (docs/recordings.md)",
        formatter_class=_Help,
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("-w", "--workload", metavar="ID", help="a workload, e.g. W1")
    source.add_argument("--trace", metavar="FILE", help="a trace file (JSON Lines)")
    export.add_argument("--format", choices=FORMATS, default="ftrace", help="the text format")
    export.add_argument("--seed", type=int, default=1, help="the workload's seed")
    export.add_argument(
        "--param", type=_key_value, action="append", metavar="KEY=VALUE", help="a parameter"
    )
    export.add_argument("-o", "--out", metavar="FILE", help="output file (default: stdout)")
    export.set_defaults(run=_export)

    ab = commands.add_parser(
        "ab",
        help="A/B comparison of zap strategies on realistic workloads",
        description=(
            "Replay workloads under several strategies and configurations, count the work each "
            "strategy does and check it with the staleness oracle. With no arguments: W1 "
            "(SeaBIOS) and W2 (OVMF) with 8 vCPUs and 16 GiB, next to the cover letter's "
            "published numbers, and W7 (the passthrough device unplugged and plugged back), "
            "under the series' five rows. Every list option may be repeated; runs are the "
            "cross product."
        ),
        formatter_class=_Help,
        epilog=AB_EXIT_STATUSES,
    )
    ab.add_argument(
        "-w",
        "--workload",
        action="append",
        metavar="ID",
        help=f"a workload: {', '.join(f'{k} ({v.title})' for k, v in WORKLOADS.items())} "
        f"(default: {', '.join(DEFAULT_WORKLOADS)})",
    )
    ab.add_argument(
        "-s",
        "--strategy",
        "--strategies",
        action="append",
        metavar="NAME[:OPT=VAL,...]",
        help=f"a strategy (repeatable; --strategies is the same option), with options if any, "
        f"e.g. lazy:scope=changed or kvm-6.5:events=acrn; "
        f"'all' adds every other built-in and installed one "
        f"(default: {', '.join((*ROWS, *EXPERIMENTS))}, and those of --plugin modules)",
    )
    ab.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help=_PLUGIN_HELP + " (its strategies join the default set)",
    )
    _add_plugin_options(ab)
    ab.add_argument(
        "--vcpus", type=int, action="append", help="vCPU count (default: the workload's)"
    )
    ab.add_argument(
        "--memory", type=_size, action="append", metavar="SIZE", help="guest RAM, e.g. 16G"
    )
    ab.add_argument(
        "--quirk",
        type=_switch,
        action="append",
        metavar="on|off",
        help="KVM_X86_QUIRK_CD_NW_CLEARED (default: on)",
    )
    ab.add_argument(
        "--feature-mtrr",
        type=_switch,
        action="append",
        metavar="on|off",
        help="guest CPUID MTRR feature (default: on)",
    )
    ab.add_argument(
        "--layout",
        action="append",
        choices=LAYOUTS,
        help="memslot layout: the workload's own (default), or one merged RAM slot",
    )
    ab.add_argument("--seed", type=int, action="append", help="trace seed (default: 1)")
    ab.add_argument(
        "--param",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="a workload parameter, e.g. ovmf_reset_cr0=0x23 or linux.touch_fraction=0.5",
    )
    ab.add_argument(
        "--trace",
        action="append",
        metavar="FILE",
        help="replay a trace file (JSON Lines, see mtrremu.workloads.trace) as well",
    )
    ab.add_argument(
        "--recording",
        action="append",
        metavar="FILE",
        help="replay a host's trace-cmd/ftrace or perf script text of kvm:kvm_msr and "
        "kvm:kvm_cr (gzip too) as well (docs/recordings.md); --memory sets its RAM "
        "(default: 16G on q35)",
    )
    ab.add_argument(
        "--recording-format",
        choices=("auto", *FORMATS),
        default="auto",
        help="the recordings' text format",
    )
    ab.add_argument(
        "--vmm",
        choices=VMMS,
        default="qemu",
        help="what the VMM wrote that the tracepoints cannot see (QEMU's reset-time pushes)",
    )
    ab.add_argument(
        "--memslots",
        metavar="FILE.json",
        help="the recordings' VM as a JSON object shaped as a trace header's \"vm\"",
    )
    ab.add_argument(
        "--burst-window-us",
        type=int,
        default=DEFAULT_BURST_WINDOW_US,
        metavar="N",
        help="recorded writes from several vCPUs, each within N µs of the one before, are one "
        "burst",
    )
    ab.add_argument("--save-traces", metavar="DIR", help="also write the generated traces")
    ab.add_argument(
        "--target",
        metavar="ADDR",
        help="replay through a live server's batch stream (host:port or unix:/path), or "
        "'spawn' to start one for this run (default: in-process)",
    )
    ab.add_argument(
        "--executor",
        metavar="SPEC",
        help="where runs execute: local:N (N processes) or dask://host:port (default: inline)",
    )
    ab.add_argument(
        "--strict-trace",
        action="store_true",
        help="fail a run whose trace has an operation the emulator refuses (an invalid host "
        "write, detaching DMA with none attached...); otherwise they are counted and shown",
    )
    ab.add_argument(
        "--allow-stale",
        action="store_true",
        help=f"exit {EXIT_CLEAN} even if a run is STALE (failed runs still exit {EXIT_FAILED})",
    )
    ab.add_argument("--out", default="results/ab", metavar="DIR", help="output folder")
    ab.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    ab.add_argument("--no-progress", action="store_true", help="no progress bar")
    ab.set_defaults(run=_ab)
    return parser


def _add_snapshot_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = commands.add_parser(
        "snapshot",
        help="export, import and check VM snapshots (docs/snapshots.md)",
        description="A snapshot file holds one VM's complete state (docs/snapshots.md).",
    )
    actions = snapshot.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write a VM's snapshot to a file")
    export.add_argument("vm_id", metavar="VM_ID")
    export.add_argument("file", metavar="FILE")
    export.set_defaults(run=_snapshot_export)
    load = actions.add_parser("import", help="create a VM from a snapshot file; prints its id")
    load.add_argument("file", metavar="FILE")
    load.set_defaults(run=_snapshot_import)
    for command in (export, load):
        command.add_argument(
            "--server", required=True, metavar="ADDR", help="host:port or unix:/path"
        )
        command.add_argument("--token-file", metavar="FILE", help="the server's token")
        command.add_argument("--tls-ca", metavar="FILE", help="PEM CA of the server (TLS)")
        command.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate")
        command.add_argument("--tls-key", metavar="FILE", help="PEM key of --tls-cert")
    check = actions.add_parser(
        "check", help="verify a snapshot file offline and describe it (exit 2 if invalid)"
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--key-file", metavar="FILE", help="the key it must be signed with")
    check.set_defaults(run=_snapshot_check)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if "trace_hooks" in args:
            _select_plugins(args)
        code: int = args.run(args)
    except MtrremuError as error:
        print(f"mtrremu: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
