"""The ``mtrremu`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mtrremu.core.errors import MtrremuError
from mtrremu.demo import DEMO_STRATEGIES, run_demo
from mtrremu.plugin.manager import default_manager
from mtrremu.server.app import DEFAULT_LISTEN, ServerSettings, serve
from mtrremu.server.limits import Limits


def _strategies(args: argparse.Namespace) -> int:
    for registered in default_manager().strategies():
        spec = registered.spec
        print(
            f"{spec.name:<20} profile {spec.profile.value:<5} "
            f"{registered.distribution} {registered.version} ({registered.plugin})"
        )
        print(f"{'':<20} {spec.description}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    names = args.strategy or list(DEMO_STRATEGIES)
    rows = run_demo(names, vcpus=args.vcpus, seed=args.seed)
    columns = ("zap_events", "zaps_executed", "leaves_removed", "entries_visited", "refaults")
    print(f"{'strategy':<20}" + "".join(f"{c:>17}" for c in columns) + f"{'stale':>8}")
    for name, counters, stale in rows:
        values = counters.as_dict()
        print(f"{name:<20}" + "".join(f"{values[c]:>17}" for c in columns) + f"{stale:>8}")
    if any(stale for _, _, stale in rows):
        print("\nstale > 0: leaves a fresh fault would now map with another memory type or IPAT.")
    return 0


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A byte count: a number with an optional K, M, G or T suffix (powers of 1024)."""
    number, suffix = text.rstrip("KMGTkmgtiIbB"), text[len(text.rstrip("KMGTkmgtiIbB")) :]
    scale = _SUFFIXES.get(suffix.upper().rstrip("IB")[:1])
    if scale is None or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64G or 16T")
    return int(number) * scale


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits = Limits(
        max_vms=args.max_vms,
        max_vm_memory_bytes=args.max_vm_memory,
        max_total_memory_bytes=args.max_total_memory,
        max_ept_bytes_per_vm=args.max_ept_memory,
        max_batch_operations=args.max_batch_operations,
        max_message_bytes=args.max_message_bytes,
    )
    settings = ServerSettings(
        listen=tuple(args.listen or [DEFAULT_LISTEN]),
        limits=limits,
        max_workers=args.max_workers,
        grace_seconds=args.grace,
    )
    serve(settings, announce=["mtrremu: serving on {addresses}"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtrremu",
        description="Emulate how Linux KVM on Intel EPT picks guest memory types and zaps.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("strategies", help="list the installed zap strategies")
    listing.set_defaults(run=_strategies)
    demo = commands.add_parser(
        "demo", help="a small SeaBIOS-like boot under several strategies, counted"
    )
    demo.add_argument("--strategy", action="append", help="a strategy to run (repeatable)")
    demo.add_argument("--vcpus", type=int, default=4, help="vCPUs (default 4)")
    demo.add_argument("--seed", type=int, default=1, help="burst order seed (default 1)")
    demo.set_defaults(run=_demo)

    defaults = Limits()
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server (mtrremu.v1)",
        description="Serve mtrremu.v1 with health checking and reflection until SIGINT/SIGTERM.",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="host:port or unix:/path (repeatable; default 127.0.0.1:50051)",
    )
    serve.add_argument("--max-vms", type=int, default=defaults.max_vms)
    serve.add_argument(
        "--max-vm-memory", type=_size, default=defaults.max_vm_memory_bytes, metavar="SIZE"
    )
    serve.add_argument(
        "--max-total-memory", type=_size, default=defaults.max_total_memory_bytes, metavar="SIZE"
    )
    serve.add_argument(
        "--max-ept-memory",
        type=_size,
        default=defaults.max_ept_bytes_per_vm,
        metavar="SIZE",
        help="EPT table memory per VM",
    )
    serve.add_argument(
        "--max-batch-operations", type=int, default=defaults.max_batch_operations, metavar="N"
    )
    serve.add_argument(
        "--max-message-bytes", type=_size, default=defaults.max_message_bytes, metavar="SIZE"
    )
    serve.add_argument("--max-workers", type=int, default=256, help="server threads")
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds in-flight calls get at shutdown"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except MtrremuError as error:
        print(f"mtrremu: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
