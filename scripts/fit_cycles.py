#!/usr/bin/env python3
"""Fit the timing model's six costs on the series' published 8-vCPU cycles (16 rows: eight
strategies, OVMF and SeaBIOS), or check the shipped defaults against them.

    python scripts/fit_cycles.py            # fit from the defaults, print the costs and the rows
    python scripts/fit_cycles.py --check    # the shipped defaults only, no fitting

The replays run once; the fit then only re-evaluates the model on their zap calls. It minimises
the sum of squared log errors, ln(model / published), plus a steep penalty on any row beyond a
factor of about 1.9, with Nelder-Mead over the logs of the costs (kept in plausible ranges).
Last line: ``rows=<n> params=<k> max_abs_log_err=<x> median_abs_log_err=<y>``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from mtrremu.ab.published import CYCLES_M, ROWS
from mtrremu.ab.runner import RunSpec, trace_for
from mtrremu.core.burst import replay
from mtrremu.core.strategy import MmuLock
from mtrremu.core.timing import DEFAULT_COSTS, CycleCosts, ZapCall, model_cycles, rounds_of
from mtrremu.plugin.manager import default_manager

Row = tuple[str, str, float, list[tuple[ZapCall, ...]], MmuLock]


def replays() -> list[Row]:
    """(workload, strategy, published cycles, zap calls, lock mode) of every published row."""
    rows = []
    for workload, published in CYCLES_M.items():
        for strategy in ROWS:
            trace = trace_for(RunSpec(workload, strategy))
            registered = default_manager().strategy(strategy)
            vm = default_manager().create_vm(trace.config, strategy)
            rounds = list(rounds_of(replay(vm, trace.items)))
            rows.append((workload, strategy, published[strategy], rounds, registered.spec.mmu_lock))
    return rows


def log_errors(rows: list[Row], costs: CycleCosts) -> npt.NDArray[np.float64]:
    modelled = [model_cycles(rounds, costs, lock).total / 1e6 for _, _, _, rounds, lock in rows]
    return np.array([math.log(m / p) for m, (_, _, p, _, _) in zip(modelled, rows, strict=True)])


def nelder_mead(
    f: Callable[[npt.NDArray[np.float64]], float],
    start: npt.NDArray[np.float64],
    step: float = 1.0,
    iterations: int = 4000,
) -> npt.NDArray[np.float64]:
    """Minimise ``f`` from ``start`` (the standard reflection/expansion/contraction rules)."""
    points = [start] + [start + step * np.eye(len(start))[i] for i in range(len(start))]
    values = [f(p) for p in points]
    for _ in range(iterations):
        order = np.argsort(values)
        points = [points[i] for i in order]
        values = [values[i] for i in order]
        if values[-1] - values[0] < 1e-10:
            break
        centre = np.mean(points[:-1], axis=0)
        reflected = centre + (centre - points[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centre + 2 * (centre - points[-1])
            fe = f(expanded)
            points[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            points[-1], values[-1] = reflected, fr
        else:
            contracted = centre + 0.5 * (points[-1] - centre)
            fc = f(contracted)
            if fc < values[-1]:
                points[-1], values[-1] = contracted, fc
            else:
                points = [points[0] + 0.5 * (p - points[0]) for p in points]
                values = [f(p) for p in points]
    best: npt.NDArray[np.float64] = points[int(np.argmin(values))]
    return best


#: Plausible ranges (cycles) the fit keeps each cost in, so that no mechanism is fitted away:
#: a TLB flush (INVEPT) costs thousands of cycles, a page-table entry tens to hundreds.
BOUNDS = {
    "entry": (5.0, 2000.0),
    "leaf": (10.0, 20000.0),
    "flush": (500.0, 200000.0),
    "spin": (10.0, 20000.0),
    "list_op": (50.0, 50000.0),
    "handoff": (50.0, 50000.0),
}
_LOW = np.log([BOUNDS[name][0] for name in CycleCosts.names()])
_HIGH = np.log([BOUNDS[name][1] for name in CycleCosts.names()])


def inverted(rows: list[Row], errors: npt.NDArray[np.float64], workload: str) -> int:
    """Pairs of ``workload``'s rows the model orders the other way round from the published."""
    own = [
        (p, math.log(p) + e)
        for (w, _, p, _, _), e in zip(rows, errors, strict=True)
        if w == workload
    ]
    return sum(1 for a in own for b in own if a[0] > b[0] and a[1] < b[1])


def fit(rows: list[Row]) -> CycleCosts:
    def costs(logs: npt.NDArray[np.float64]) -> CycleCosts:
        return CycleCosts(*np.exp(np.clip(logs, _LOW, _HIGH)))

    def loss(logs: npt.NDArray[np.float64]) -> float:
        errors = log_errors(rows, costs(logs))
        # Squared errors, and a steep price for any row beyond a factor of about 1.9: the
        # calibration must hold for every row, not on average.
        return float(np.sum(errors**2) + 100 * np.sum(np.maximum(np.abs(errors) - 0.64, 0) ** 2))

    best = np.log(np.array(DEFAULT_COSTS.as_tuple()))
    for _ in range(3):  # restarts around the best point found so far
        best = nelder_mead(loss, best)
    return CycleCosts(*(float(f"{v:.3g}") for v in costs(best).as_tuple()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="evaluate the defaults only")
    args = parser.parse_args()
    rows = replays()
    costs = DEFAULT_COSTS if args.check else fit(rows)
    print(
        "costs (cycles): "
        + ", ".join(f"{k}={v:g}" for k, v in zip(CycleCosts.names(), costs.as_tuple(), strict=True))
    )
    errors = log_errors(rows, costs)
    for (workload, strategy, published, rounds, lock), error in zip(rows, errors, strict=True):
        cycles = model_cycles(rounds, costs, lock).millions()
        print(
            f"{workload} {strategy:<26} published {published:9.2f}  model {cycles['total']:9.2f}"
            f"  (work {cycles['work']:.2f}, waiting {cycles['waiting']:.2f}, yields "
            f"{cycles['yields']:.2f})  ln err {error:+.2f}"
        )
    for firmware, workload in (("OVMF", "W2"), ("SeaBIOS", "W1")):
        print(
            f"{firmware}: {inverted(rows, errors, workload)} pairs of rows ordered unlike "
            "the published cycles"
        )
    absolute = np.abs(errors)
    print(
        f"rows={len(rows)} params={len(CycleCosts.names())} "
        f"max_abs_log_err={absolute.max():.2f} median_abs_log_err={float(np.median(absolute)):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
