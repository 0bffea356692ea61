"""Long traces (docs/traces.md#reading-a-long-trace): the canonical-line fast path reads what
the JSON parser reads, items in columns read back as they went in (spooled to a file or not),
and a replay's memory does not grow with the trace's length."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest

from mtrremu.ab.runner import InlineExecutor, Plan, run_all, trace_for
from mtrremu.core import cr0, msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import Access, Burst, Item, MsrValue, WriteCr0, WriteMsr, WriteMsrs
from mtrremu.workloads import build, columns
from mtrremu.workloads.columns import TraceItems
from mtrremu.workloads.trace import Trace, TraceFormatError, lines, parse, save
from tests.helpers import GIB
from tests.test_trace_format import SMALL


@pytest.mark.parametrize("name", sorted(SMALL))
def test_canonical_lines_and_any_other_spelling_read_the_same(name: str) -> None:
    original = build(name, SMALL[name], seed=2)
    canonical = list(lines(original))
    # The same records spelt otherwise (spaces, keys sorted): the JSON parser's path only.
    respelt = [canonical[0]] + [json.dumps(json.loads(t), sort_keys=True) for t in canonical[1:]]
    assert respelt[1:] != canonical[1:]
    fast, slow = parse(canonical), parse(respelt)
    assert list(fast.items) == list(slow.items) == list(original.items)
    assert fast.operations == slow.operations == original.operations
    assert fast == slow == original


def test_canonical_lines_are_checked_like_any_other() -> None:
    header = next(lines(Trace("t", VmConfig(vcpus=2), ())))
    for line, why in [
        ('{"op":"write_msr","vcpu":2,"msr":"0x2ff","value":"0x0","host":false}', "vCPU 2"),
        ('{"op":"write_msr","vcpu":0,"msr":"0x1000002ff","value":"0x0","host":false}', "32 bits"),
        ('{"op":"access_gpa","vcpu":0,"gpa":"0x10000000000000000"}', "64 bits"),
    ]:
        with pytest.raises(TraceFormatError, match=why) as caught:
            parse([header, line], "x.jsonl")
        assert caught.value.line == 2


def _mixed(count: int) -> list[Item]:
    """Every shape of item: rows of several kinds, flags set, and items kept whole."""
    items: list[Item] = []
    for i in range(count):
        vcpu = i % 4
        match i % 5:
            case 0:
                items.append(WriteMsr(vcpu, msrs.MTRR_MSRS[i % len(msrs.MTRR_MSRS)], i, i % 2 == 0))
            case 1:
                items.append(WriteCr0(vcpu, cr0.ET | (cr0.CD if i % 3 else 0), i % 7 == 0))
            case 2:
                items.append(Access(vcpu, (i << 12) % (4 * GIB)))
            case 3:
                items.append(WriteMsrs(vcpu, (MsrValue(msrs.PAT, i), MsrValue(msrs.DEFTYPE, 0))))
            case _:
                items.append(Burst(((vcpu, (WriteCr0(vcpu, cr0.ET),)), (5, ())), seed=i))
    return items


@pytest.mark.parametrize("memory_bytes", [columns.MEMORY_BYTES, 0], ids=["memory", "spooled"])
def test_columns_give_back_what_went_in(memory_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columns, "CHUNK_ROWS", 256)
    chunk = columns.CHUNK_ROWS
    items = _mixed(4 * chunk + 100)
    held = TraceItems(memory_bytes)
    held.extend(items)
    held.seal()
    assert held.spooled == (memory_bytes == 0)
    assert len(held) == len(items)
    assert list(held) == items
    assert list(held) == items  # again: a spooled trace is read back as often as asked
    for index in (0, 3, chunk - 1, chunk, len(items) - 1, -1):
        assert held[index] == items[index]
    assert held[10:13] == items[10:13]
    assert held.operations == sum(
        sum(len(ops) for _, ops in i.lanes) if isinstance(i, Burst) else 1 for i in items
    )
    held.close()


def _long_trace(path: Path, count: int) -> None:
    items: list[Item] = []
    for i in range(count):
        if i % 8 == 7:
            items.append(WriteCr0(i % 2, cr0.ET | (cr0.CD if i % 32 < 16 else 0)))
        elif i % 8 == 3:
            items.append(WriteMsr(i % 2, msrs.DEFTYPE, 0xC06 if i % 64 < 32 else 0x806))
        else:
            items.append(WriteMsr(i % 2, msrs.FIXED_MSRS[i % 11], i % 3 * 0x0606060606060606))
    save(Trace("long", VmConfig(vcpus=2, noncoherent_dma=1), tuple(items)), path)


def test_a_replay_holds_neither_the_trace_nor_its_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prediction: with every chunk spooled, the peak is one chunk being replayed, whatever
    the length; three times the trace may not cost noticeably more."""
    monkeypatch.setattr(columns, "MEMORY_BYTES", 0)
    monkeypatch.setattr(columns, "CHUNK_ROWS", 1024)  # small chunks: a short test
    peaks = []
    for count in (2000, 6000, 18000):  # the first warms up (imports, caches): not compared
        path = tmp_path / f"{count}.jsonl"
        _long_trace(path, count)
        plan = Plan(workloads=(), traces=[str(path)], strategies=["kvm-6.5"])
        (spec,) = plan.specs()
        trace_for(spec)  # parsed now (a job parses a file once): the replay alone is measured
        gc.collect()
        tracemalloc.start()
        (record,) = run_all(plan.specs(), InlineExecutor())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert record["verdict"] != "failed"
        assert record["counters"]["zap_events"] > 0
    assert peaks[2] < 1.25 * peaks[1], peaks
