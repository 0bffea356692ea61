"""The A/B record: one JSON object per run (JSON Lines), schema ``mtrremu.ab/2``.

Fields:

``schema``            ``"mtrremu.ab/2"``
``workload``          ``"W1"``… or a trace file's name; ``params`` its parameters
                      (seed included, sizes in bytes); ``seed``
``strategy``          name, with its options if any (``lazy:scope=changed``);
                      ``profile`` (``"6.5"``…); ``plugin``: ``{"name", "distribution",
                      "version"}`` of the plugin providing it
``config``            the VM: ``vcpus``, ``memory_bytes`` (all memslots), ``quirk_cd_nw_cleared``,
                      ``feature_mtrr``, ``guest_maxphyaddr``, ``max_mapping_level``,
                      ``memslots`` (``[base, size, kind, name]``); ``label``: the configuration
                      this run stands for in tables
``mode``              ``"in-process"`` or ``"grpc"`` (``target`` then names the server)
``operations``        operations replayed (bursts counted by their lane operations)
``verdict``           ``"clean"``, ``"stale"`` (the oracle found stale leaves after an event or
                      at the end) or ``"failed"`` (see ``failure``)
``failure``           ``null``, or why the run failed: ``{"kind", "hook", "error"}`` with
                      ``kind`` ``"strategy"`` (the strategy's factory or one of its methods
                      raised or returned something other than a decision; ``hook`` names it),
                      ``"refusals"`` (``--strict-trace`` and the emulator refused operations) or
                      ``"error"`` (anything else, e.g. the server went away)
``refused``           operations the emulator refused, by reason (``HOST_WRITE_REJECTED``,
                      ``FAILED_PRECONDITION``, …); they changed nothing
``host_disagreements`` for a host recording replayed in-process (docs/recordings.md): guest MSR
                      writes the emulator faulted and the host did not, or the other way
                      round: ``{"count", "first"}`` (``first`` describes one, or ``null``);
                      ``null`` otherwise
``counters``          every counter of :class:`mtrremu.core.counters.Counters`, plus the totals
                      ``leaves_removed``, ``entries_visited`` and ``recalc_work`` (zeros if
                      the replay never ran)
``staleness``         the oracle at quiescent points: ``checks``, ``stale_points``,
                      ``stale_leaves_max``; ``at_end``: stale leaves at the end (``null`` if
                      the vCPUs disagree then, or the replay never ran); after each event:
                      ``event_checks``, ``stale_events``, ``stale_event_leaves_max``,
                      ``excused`` (events a declared gap of the strategy explained, by gap)
                      and ``first_stale_event`` (see :class:`mtrremu.core.vm.StalenessLog`)
``published``         the cover letter's numbers for this setup, or ``null``
``cycles_model``      the timing model's cycles spent inside zap calls, in millions (3.1 GHz
                      host; docs/timing.md), or ``null`` if the replay never ran;
                      ``cycles_parts``: ``{"work", "waiting", "yields"}`` (millions);
                      ``cycles_basis``: ``"calibration"`` where the cover letter published
                      cycles for the setup (the model was fitted on them), else
                      ``"prediction"``
``wall_seconds``      how long the replay took (the only field that is not reproducible)
``mtrremu_version``   the emulator's version
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtrremu.ab.published import published
from mtrremu.core.counters import Counters
from mtrremu.core.oracle import STALENESS_COUNTS
from mtrremu.core.units import PAGE_SHIFT
from mtrremu.plugin.manager import RegisteredStrategy, own_version
from mtrremu.workloads.trace import Trace

if TYPE_CHECKING:
    from mtrremu.ab.runner import Replay, RunSpec

SCHEMA = "mtrremu.ab/2"


def record(
    spec: RunSpec,
    trace: Trace,
    registered: RegisteredStrategy,
    replay: Replay | None,
    failure: dict[str, Any] | None,
    *,
    seconds: float,
) -> dict[str, Any]:
    config = trace.config
    ram = trace.params.get("ram", config.memory_pages << PAGE_SHIFT)
    pub = published(spec.workload, spec.strategy, config.vcpus, int(ram))
    if replay is None:
        counters = Counters().as_dict()
        staleness: dict[str, Any] = dict.fromkeys(STALENESS_COUNTS, 0)
        staleness |= {"excused": {}, "first_stale_event": "", "at_end": None}
        refused: dict[str, int] = {}
    else:
        counters, staleness, refused = replay.counters, replay.staleness, replay.refused
    cycles = None if replay is None else replay.cycles.millions()
    fitted = pub is not None and pub.cycles_m is not None
    return {
        "schema": SCHEMA,
        "workload": spec.workload,
        "params": dict(trace.params),
        "seed": spec.seed,
        "strategy": spec.strategy,
        "profile": registered.spec.profile.value,
        "plugin": {
            "name": registered.plugin,
            "distribution": registered.distribution,
            "version": registered.version,
        },
        "config": {
            "vcpus": config.vcpus,
            "memory_bytes": config.memory_pages << PAGE_SHIFT,
            "quirk_cd_nw_cleared": config.quirk_cd_nw_cleared,
            "feature_mtrr": config.feature_mtrr,
            "guest_maxphyaddr": config.guest_maxphyaddr,
            "max_mapping_level": config.max_mapping_level.label,
            "memslots": [
                [s.base_gfn << PAGE_SHIFT, s.pages << PAGE_SHIFT, s.kind.value, s.name]
                for s in config.sorted_memslots()
            ],
        },
        "label": spec.label,
        "mode": "in-process" if spec.target is None else "grpc",
        "target": spec.target,
        "operations": trace.operations,
        "verdict": verdict(staleness, failure),
        "failure": failure,
        "refused": refused,
        "host_disagreements": None if replay is None else replay.host_disagreements,
        "counters": counters,
        "staleness": staleness,
        "published": None
        if pub is None
        else {"firmware": pub.firmware, "zap_count": pub.zap_count, "cycles_m": pub.cycles_m},
        "cycles_model": None if cycles is None else cycles.pop("total"),
        "cycles_parts": cycles,
        "cycles_basis": "calibration" if fitted else "prediction",
        "wall_seconds": round(seconds, 4),
        "mtrremu_version": own_version(),
    }


def verdict(staleness: dict[str, Any], failure: dict[str, Any] | None) -> str:
    """``failed`` wins over ``stale`` (stale leaves at a quiescent point, at the end, or left
    by an event for its own vCPU), which wins over ``clean``."""
    if failure is not None:
        return "failed"
    stale = staleness["stale_points"] or staleness["at_end"] or staleness["stale_events"]
    return "stale" if stale else "clean"
