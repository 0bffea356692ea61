"""The JSON Lines trace format (mtrremu.workloads.trace): round trips, determinism, and the
line-numbered rejection of malformed files, in the library and through ``mtrremu ab --trace``."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mtrremu.ab import runner
from mtrremu.core.burst import execute
from mtrremu.core.config import Memslot, MemslotKind
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
    ReadCounters,
    ReadMsr,
    ReadVcpuState,
    Reset,
    WriteCr0,
    WriteMsr,
    WriteMsrs,
)
from mtrremu.core.units import Level
from mtrremu.workloads import WORKLOADS, build
from mtrremu.workloads.trace import Trace, TraceFormatError, lines, load, parse, save
from tests.helpers import GIB, create_vm, run_ab

#: Small parameters for every workload: a few vCPUs, a few GiB.
SMALL: dict[str, dict[str, Any]] = {
    "W1": {"vcpus": 2, "ram": 4 * GIB},
    "W2": {"vcpus": 3, "ram": 4 * GIB},
    "W3": {"vcpus": 2, "ram": 4 * GIB},
    "W4": {"vcpus": 4, "ram": 64 * GIB, "max_mapping_level": "1G"},
    "W5": {"vcpus": 2, "ram": 4 * GIB},
    "W6": {"vcpus": 4, "ram": 4 * GIB},
    "W7": {"vcpus": 3, "ram": 4 * GIB},
}


def replay(trace: Trace) -> dict[str, int]:
    """The counters of an in-process fine-grained replay of ``trace``."""
    vm = create_vm(trace.config, "fine-grained")
    execute(vm, trace.items)
    return vm.counters_snapshot().as_dict()


def bursts(trace: Trace) -> list[Burst]:
    return [item for item in trace.items if isinstance(item, Burst)]


def test_small_parameters_cover_every_workload() -> None:
    assert sorted(SMALL) == sorted(WORKLOADS)


# -- round trips and determinism ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_save_then_load_gives_an_equal_trace_and_the_same_replay(name: str, tmp_path: Path) -> None:
    original = build(name, SMALL[name], seed=3)
    path = tmp_path / f"{name}.jsonl"
    save(original, path)
    loaded = load(path)

    assert loaded.workload == original.workload == name
    assert loaded.config == original.config
    assert dict(loaded.params) == dict(original.params)
    assert loaded.params["seed"] == 3
    assert len(loaded.items) == len(original.items) > 0
    for index, (got, want) in enumerate(zip(loaded.items, original.items, strict=True)):
        assert type(got) is type(want), index
        assert got == want, index
    assert loaded == original
    assert loaded.operations == original.operations
    # The file is exactly what lines() renders: one header, one line per item.
    assert path.read_text().splitlines() == list(lines(original))

    counters = replay(original)
    assert replay(loaded) == counters
    assert counters["zap_events"] + counters["dma_zap_events"] > 0


def test_w4_small_config_survives_the_round_trip(tmp_path: Path) -> None:
    original = build("W4", SMALL["W4"], seed=1)
    save(original, tmp_path / "w4.jsonl")
    config = load(tmp_path / "w4.jsonl").config
    assert config.vcpus == 4
    assert config.max_mapping_level is Level.G1
    assert config.guest_maxphyaddr == 46
    # q35: 64 GiB of RAM less the VGA hole [0xa0000, 0xc0000), plus 256 KiB of flash.
    assert config.memory_pages << 12 == 64 * GIB - 0x20000 + 0x40000
    assert [slot.name for slot in config.memslots] == [
        "ram-below-vga",
        "ram-low",
        "ram-high",
        "flash",
    ]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_same_workload_params_and_seed_give_the_same_trace(name: str, tmp_path: Path) -> None:
    first, second = build(name, SMALL[name], seed=5), build(name, SMALL[name], seed=5)
    assert list(lines(first)) == list(lines(second))
    save(first, tmp_path / "a.jsonl")
    save(second, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize(("name", "count"), [("W1", 1), ("W2", 5)])
def test_a_different_seed_changes_the_burst_seeds_only(name: str, count: int) -> None:
    one, two = build(name, SMALL[name], seed=1), build(name, SMALL[name], seed=2)
    seeds_one, seeds_two = [b.seed for b in bursts(one)], [b.seed for b in bursts(two)]
    assert len(seeds_one) == len(seeds_two) == count
    assert all(a != b for a, b in zip(seeds_one, seeds_two, strict=True))
    assert list(lines(one)) != list(lines(two))

    def unseeded(trace: Trace) -> list[object]:
        return [
            dataclasses.replace(item, seed=0) if isinstance(item, Burst) else item
            for item in trace.items
        ]

    # With the default (ascending) orders the seed only picks the bursts' round order.
    assert unseeded(one) == unseeded(two)
    assert one.config == two.config
    assert (one.params["seed"], two.params["seed"]) == (1, 2)


# -- reading hand-written files -------------------------------------------------------------

VM: dict[str, Any] = {
    "vcpus": 2,
    "memslots": [{"base_gpa": "0x0", "size_bytes": "0x40000000", "kind": "ram", "name": "ram"}],
}
HEADER: dict[str, Any] = {"format": "mtrremu-trace", "version": 2, "workload": "hand", "vm": VM}


def header(**changes: Any) -> str:
    """The header line with top-level keys replaced (a value of None drops the key)."""
    record = {**HEADER, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not None})


def vm_header(**changes: Any) -> str:
    """The header line with "vm" keys replaced (a value of None drops the key)."""
    vm = {k: v for k, v in {**VM, **changes}.items() if v is not None}
    return header(vm=vm)


def slots(*spans: tuple[str, str]) -> list[dict[str, str]]:
    return [{"base_gpa": base, "size_bytes": size} for base, size in spans]


def write(tmp_path: Path, text_lines: Sequence[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(line + "\n" for line in text_lines))
    return path


def test_a_hand_written_file_parses_every_item_kind(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            vm_header(
                memslots=[
                    {"base_gpa": 0, "size_bytes": "0xa0000", "name": "low"},
                    {
                        "base_gpa": "0xc0000000",
                        "size_bytes": 0x1000000,
                        "kind": "device",
                        "name": "bar",
                    },
                ],
                max_mapping_level="2M",
                quirk_cd_nw_cleared=False,
                noncoherent_dma=0,
            ),
            '{"op": "write_msr", "vcpu": 0, "msr": "0x2ff", "value": "0xc06", "host": true}',
            '{"op": "write_msr", "vcpu": "0x1", "msr": 767, "value": 3078}',
            '{"op": "read_msr", "vcpu": 0, "msr": "0x277"}',
            '{"op": "write_cr0", "vcpu": 1, "value": "0x60000010", "host": false}',
            "",
            '{"op": "reset_vcpu", "vcpu": 1}',
            '{"op": "init_vcpu", "vcpu": 1}',
            '{"op": "access_gpa", "vcpu": 0, "gpa": "0x1000"}',
            '{"op": "fault_range", "vcpu": 1, "start_gpa": "0x0", "end_gpa": "0x40000"}',
            '{"op": "attach_dma"}',
            '{"op": "detach_dma"}',
            '{"burst": {"seed": 7, "lanes": [{"vcpu": 1, "operations": [{"op": "init_vcpu",'
            ' "vcpu": 1}]}, {"vcpu": 0, "operations": [{"op": "reset_vcpu", "vcpu": 0},'
            ' {"op": "read_msr", "vcpu": 0, "msr": "0xfe"}]}]}}',
            '{"burst": {"lanes": [{"vcpu": 0, "operations": []},'
            ' {"vcpu": 1, "operations": [{"op": "read_vcpu_state", "vcpu": 1}]}]}}',
            '{"op": "write_msrs", "vcpu": 1, "msrs": [{"msr": "0x2ff", "value": 0},'
            ' {"msr": 592, "value": "0x606060606060606"}]}',
            '{"op": "read_vcpu_state", "vcpu": 0}',
            '{"op": "lookup_gpa", "gpa": "0xc0000000"}',
            '{"op": "read_counters"}',
            '{"op": "check_staleness", "vcpu": 1}',
            '{"op": "check_staleness", "at_quiescence": true}',
        ],
    )
    trace = load(path)
    assert trace.workload == "hand"
    assert dict(trace.params) == {}
    assert trace.config.vcpus == 2
    assert trace.config.memslots == (
        Memslot(0, 0xA0, MemslotKind.RAM, "low"),
        Memslot(0xC0000, 0x1000, MemslotKind.DEVICE, "bar"),
    )
    assert trace.config.max_mapping_level is Level.M2
    assert trace.config.quirk_cd_nw_cleared is False
    assert trace.config.noncoherent_dma == 0
    assert trace.items == (
        WriteMsr(0, 0x2FF, 0xC06, True),
        WriteMsr(1, 0x2FF, 0xC06, False),
        ReadMsr(0, 0x277, False),
        WriteCr0(1, 0x60000010, False),
        Reset(1),
        Init(1),
        Access(0, 0x1000),
        FaultRange(1, 0, 0x40000),
        AttachDma(),
        DetachDma(),
        Burst(((1, (Init(1),)), (0, (Reset(0), ReadMsr(0, 0xFE, False)))), 7),
        Burst(((0, ()), (1, (ReadVcpuState(1),))), 0),
        WriteMsrs(1, (MsrValue(0x2FF, 0), MsrValue(0x250, 0x0606060606060606))),
        ReadVcpuState(0),
        LookupGpa(0xC0000000),
        ReadCounters(),
        CheckStaleness(1, False),
        CheckStaleness(0, True),
    )
    assert trace.operations == 20


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    text = [
        header(),
        "",
        '{"op": "reset_vcpu", "vcpu": 0}',
        "   ",
        "\t",
        '{"op": "init_vcpu", "vcpu": 1}',
        "",
    ]
    assert load(write(tmp_path, text)).items == (Reset(0), Init(1))


# -- malformed files ------------------------------------------------------------------------

OP = '{"op": "reset_vcpu", "vcpu": 0}'

#: (id, file lines, line of the error, phrase its reason holds)
MALFORMED: list[tuple[str, list[str], int, str]] = [
    ("empty file", [], 1, "empty trace: no header line"),
    ("first line an item", [OP], 1, 'the first line must be a header with "format"'),
    ("first line an array", ["[1, 2]"], 1, 'the first line must be a header with "format"'),
    ("no format", [header(format=None)], 1, 'the first line must be a header with "format"'),
    ("wrong format", [header(format="other")], 1, 'the first line must be a header with "format"'),
    ("version 1", [header(version=1)], 1, "unsupported version 1 (want 2)"),
    ("version string", [header(version="2")], 1, "unsupported version '2' (want 2)"),
    ("no version", [header(version=None)], 1, "unsupported version None (want 2)"),
    ("no vm", [header(vm=None)], 1, 'the header needs a "vm" object'),
    ("vm a list", [header(vm=[])], 1, 'the header needs a "vm" object'),
    ("no memslots", [vm_header(memslots=None)], 1, '"vm" needs a non-empty "memslots" list'),
    ("empty memslots", [vm_header(memslots=[])], 1, '"vm" needs a non-empty "memslots" list'),
    ("memslot a string", [vm_header(memslots=["ram"])], 1, "a memslot must be an object"),
    (
        "memslot size unaligned",
        [vm_header(memslots=slots(("0x0", "0x1800")))],
        1,
        "base and size must be 4 KiB aligned",
    ),
    (
        "memslot base unaligned",
        [vm_header(memslots=slots(("0x800", "0x1000")))],
        1,
        "base and size must be 4 KiB aligned",
    ),
    (
        "memslots overlap",
        [vm_header(memslots=slots(("0x0", "0x200000"), ("0x100000", "0x200000")))],
        1,
        "memslots overlap",
    ),
    (
        "memslot kind",
        [vm_header(memslots=[{"base_gpa": 0, "size_bytes": 4096, "kind": "rom"}])],
        1,
        'memslot kind must be "ram" or "device", not \'rom\'',
    ),
    ("no vcpus", [vm_header(vcpus=None)], 1, "missing 'vcpus'"),
    ("zero vcpus", [vm_header(vcpus=0)], 1, "vcpus must be between 1 and 4096, got 0"),
    ("mapping level", [vm_header(max_mapping_level="512G")], 1, "unknown mapping level '512G'"),
    ("params a list", [header(params=[1]), OP], 1, '"params" must be an object'),
    ("not JSON", [header(), OP, "{oops"], 3, "not JSON: "),
    ("unknown op", [header(), '{"op": "frobnicate", "vcpu": 0}'], 2, "unknown operation"),
    ("no op", [header(), '{"vcpu": 0}'], 2, "unknown operation None"),
    ("op an array", [header(), "[1]"], 2, "an operation must be an object"),
    (
        "wrmsr without value",
        [header(), '{"op": "write_msr", "vcpu": 0, "msr": "0x2ff"}'],
        2,
        "missing 'value'",
    ),
    ("rdmsr without msr", [header(), '{"op": "read_msr", "vcpu": 0}'], 2, "missing 'msr'"),
    ("access without gpa", [header(), '{"op": "access_gpa", "vcpu": 0}'], 2, "missing 'gpa'"),
    ("reset without vcpu", [header(), '{"op": "reset_vcpu"}'], 2, "missing 'vcpu'"),
    (
        "vcpu a word",
        [header(), '{"op": "reset_vcpu", "vcpu": "x"}'],
        2,
        "'vcpu' is not a number: 'x'",
    ),
    (
        "vcpu a boolean",
        [header(), '{"op": "reset_vcpu", "vcpu": true}'],
        2,
        "'vcpu' must be an integer or a \"0x…\" string, not True",
    ),
    (
        "vcpu a float",
        [header(), '{"op": "reset_vcpu", "vcpu": 1.5}'],
        2,
        "'vcpu' must be an integer or a \"0x…\" string, not 1.5",
    ),
    (
        "value over 64 bits",
        [
            header(),
            '{"op": "write_msr", "vcpu": 0, "msr": "0x2ff", "value": "0x10000000000000000"}',
        ],
        2,
        "'value' = '0x10000000000000000' does not fit in 64 bits",
    ),
    (
        "value 2**64 as a JSON integer",
        [header(), '{"op": "write_cr0", "vcpu": 0, "value": 18446744073709551616}'],
        2,
        "'value' = 18446744073709551616 does not fit in 64 bits",
    ),
    (
        "negative value",
        [header(), '{"op": "write_cr0", "vcpu": 0, "value": -1}'],
        2,
        "'value' = -1 does not fit in 64 bits",
    ),
    (
        "msr over 32 bits",
        [header(), '{"op": "read_msr", "vcpu": 0, "msr": "0x100000000"}'],
        2,
        "'msr' = '0x100000000' does not fit in 32 bits",
    ),
    (
        "host a number",
        [header(), '{"op": "write_cr0", "vcpu": 0, "value": "0x11", "host": 1}'],
        2,
        "'host' must be true or false, not 1",
    ),
    (
        "host a string",
        [header(), '{"op": "write_msr", "vcpu": 0, "msr": 767, "value": 0, "host": "false"}'],
        2,
        "'host' must be true or false, not 'false'",
    ),
    (
        "fault_range start unaligned",
        [header(), '{"op": "fault_range", "vcpu": 0, "start_gpa": "0x1001", "end_gpa": "0x4000"}'],
        2,
        "'start_gpa' = 0x1001 is not 4 KiB aligned",
    ),
    (
        "fault_range end unaligned",
        [header(), '{"op": "fault_range", "vcpu": 0, "start_gpa": "0x0", "end_gpa": 8191}'],
        2,
        "'end_gpa' = 0x1fff is not 4 KiB aligned",
    ),
    (
        "fault_range inverted",
        [header(), '{"op": "fault_range", "vcpu": 0, "start_gpa": "0x4000", "end_gpa": "0x1000"}'],
        2,
        "fault_range needs start_gpa < end_gpa",
    ),
    (
        "fault_range empty",
        [header(), '{"op": "fault_range", "vcpu": 0, "start_gpa": "0x4000", "end_gpa": "0x4000"}'],
        2,
        "fault_range needs start_gpa < end_gpa",
    ),
    (
        "vcpu beyond the VM",
        [header(), OP, '{"op": "init_vcpu", "vcpu": 2}'],
        3,
        "vCPU 2 does not exist (the trace's VM has 2)",
    ),
    (
        "burst lane beyond the VM",
        [
            header(),
            '{"burst": {"lanes": [{"vcpu": 5, "operations": [{"op": "init_vcpu", "vcpu": 5}]}]}}',
        ],
        2,
        "vCPU 5 does not exist (the trace's VM has 2)",
    ),
    (
        "burst lane with another vCPU's op",
        [
            header(),
            '{"burst": {"lanes": [{"vcpu": 0, "operations": [{"op": "init_vcpu", "vcpu": 1}]}]}}',
        ],
        2,
        "burst lane of vCPU 0 holds an op of vCPU 1",
    ),
    (
        "burst with two lanes for one vCPU",
        [
            header(),
            '{"burst": {"lanes": [{"vcpu": 1, "operations": []}, {"vcpu": 0, "operations": []},'
            ' {"vcpu": "0x1", "operations": []}]}}',
        ],
        2,
        "burst has two lanes for vCPU 1",
    ),
    (
        "attach_dma in a burst",
        [header(), '{"burst": {"lanes": [{"vcpu": 0, "operations": [{"op": "attach_dma"}]}]}}'],
        2,
        "attach_dma cannot be part of a burst",
    ),
    (
        "detach_dma in a burst",
        [header(), '{"burst": {"lanes": [{"vcpu": 0, "operations": [{"op": "detach_dma"}]}]}}'],
        2,
        "detach_dma cannot be part of a burst",
    ),
    ("burst without lanes", [header(), '{"burst": {"seed": 1}}'], 2, 'a burst needs a "lanes"'),
    (
        "burst without operations",
        [header(), '{"burst": {"lanes": [{"vcpu": 0, "operations": []}]}}'],
        2,
        "a burst needs at least one operation",
    ),
    (
        "unknown field",
        [header(), '{"op": "access_gpa", "vcpu": 0, "gpa": 0, "gfn": "0x1"}'],
        2,
        "access_gpa has no field 'gfn'",
    ),
    (
        "burst lane without operations",
        [header(), '{"burst": {"lanes": [{"vcpu": 0}]}}'],
        2,
        'each burst lane needs "vcpu" and an "operations" list',
    ),
    (
        "burst seed over 64 bits",
        [
            header(),
            '{"burst": {"seed": "0x1ffffffffffffffff", "lanes": [{"vcpu": 0, "operations": ['
            + OP
            + "]}]}}",
        ],
        2,
        "'seed' = '0x1ffffffffffffffff' does not fit in 64 bits",
    ),
    (
        "blank lines count",
        [header(), "", OP, "   ", "", '{"op": "write_msr", "vcpu": 0, "msr": "0x2ff"}', ""],
        6,
        "missing 'value'",
    ),
    ("blank lines before a bad line", ["", "", header(), "", "nope"], 5, "not JSON: "),
]


@pytest.mark.parametrize(
    ("text_lines", "line", "phrase"),
    [pytest.param(text, line, phrase, id=name) for name, text, line, phrase in MALFORMED],
)
def test_a_malformed_file_is_rejected_with_its_line_and_reason(
    text_lines: list[str], line: int, phrase: str, tmp_path: Path
) -> None:
    path = write(tmp_path, text_lines)
    with pytest.raises(TraceFormatError) as caught:
        load(path)
    error = caught.value
    assert (error.line, error.source) == (line, str(path))
    assert phrase in error.why
    assert str(error) == f"{path}:{line}: {error.why}"
    assert error.reason == "INVALID_TRACE"
    assert error.status == "INVALID_ARGUMENT"


def test_parse_names_its_source() -> None:
    with pytest.raises(TraceFormatError) as caught:
        parse([header(), "", "{"], "inline-source")
    assert (caught.value.source, caught.value.line) == ("inline-source", 3)
    assert str(caught.value).startswith("inline-source:3: not JSON: ")


# -- bugs: each asserts the documented behaviour ----------------------------------------------


def test_version_true_is_not_version_1(tmp_path: Path) -> None:
    # json true == 1 in Python: ``record.get("version") != VERSION`` lets it through.
    with pytest.raises(TraceFormatError) as caught:
        load(write(tmp_path, [header(version=True)]))
    assert caught.value.line == 1
    assert "unsupported version True" in caught.value.why


def test_an_unknown_op_without_a_vcpu_is_reported_as_unknown(tmp_path: Path) -> None:
    # A misspelt VM-wide op ("attach-dma") is reported as "missing 'vcpu'", because the
    # reader reads "vcpu" before it looks at the kind.
    with pytest.raises(TraceFormatError) as caught:
        load(write(tmp_path, [header(), '{"op": "attach-dma"}']))
    assert caught.value.line == 2
    assert "unknown operation 'attach-dma'" in caught.value.why


def test_header_flags_must_be_booleans(tmp_path: Path) -> None:
    # The header's flags go through bool(): "false" (a non-empty string) silently means true.
    accepted = []
    for key in ("quirk_cd_nw_cleared", "feature_mtrr", "tdp"):
        try:
            trace = load(write(tmp_path, [vm_header(**{key: "false"})]))
        except TraceFormatError as error:
            assert error.line == 1
            assert key in error.why
        else:
            accepted.append((key, getattr(trace.config, key)))
    assert accepted == []


def test_a_file_that_is_not_utf8_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.jsonl"
    path.write_bytes(header().encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(TraceFormatError) as caught:
        load(path)
    assert caught.value.line == 2


def test_a_trace_format_error_survives_pickling() -> None:
    # Runs under ``--executor local:N`` or Dask send their exceptions back pickled.
    error = TraceFormatError("t.jsonl", 4, "missing 'vcpu'")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TraceFormatError
    assert (copy.source, copy.line, copy.why) == ("t.jsonl", 4, "missing 'vcpu'")
    assert str(copy) == "t.jsonl:4: missing 'vcpu'"


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("executor", [None, "local:2"], ids=["inline", "local-2"])
def test_the_cli_rejects_a_malformed_trace_file(executor: str | None, tmp_path: Path) -> None:
    bad = write(tmp_path, [header(), "", OP, '{"op": "init_vcpu", "vcpu": 7}'])
    extra = [] if executor is None else ["--executor", executor, "-s", "zap-all"]
    done = run_ab("--trace", str(bad), *extra, out=tmp_path / "out", timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    why = "vCPU 7 does not exist (the trace's VM has 2)"
    assert done.stderr.splitlines() == [f"mtrremu: {bad}:4: {why}"]
    assert not (tmp_path / "out" / "ab.jsonl").exists()


def test_a_trace_file_is_parsed_once_for_all_the_runs_that_replay_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w1.jsonl"
    save(build("W1", {}, 1), path)
    parsed: list[Path] = []

    def counted(source: Path) -> Trace:
        parsed.append(source)
        return load(source)

    monkeypatch.setattr(runner, "load", counted)
    runner._loaded.cache_clear()
    strategies = ["zap-all", "fine-grained", "kvm-6.5"]
    plan = runner.Plan(workloads=[], traces=[str(path)], strategies=strategies)
    records = runner.run_all(plan.specs(), runner.InlineExecutor())
    assert len(records) == 3 and len(parsed) == 1
    path.write_text(path.read_text() + "\n")  # a changed file is read again
    runner.run_all(plan.specs()[:1], runner.InlineExecutor())
    assert len(parsed) == 2
