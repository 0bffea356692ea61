"""The ``mtrremu`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mtrremu.core.errors import MtrremuError
from mtrremu.demo import DEMO_STRATEGIES, run_demo
from mtrremu.plugin.manager import default_manager


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
