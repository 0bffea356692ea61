"""Host recordings (docs/recordings.md): trace-cmd/ftrace and perf script text imported as
traces, the exporter, and the comparison of the host's #GP verdicts with the emulator's."""

from __future__ import annotations

import gc
import gzip
import tracemalloc
from pathlib import Path

import pytest

from mtrremu.ab.runner import Plan, RunSpec, run
from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.events import Burst, WriteCr0, WriteMsr
from mtrremu.workloads import build, columns
from mtrremu.workloads.layouts import q35
from mtrremu.workloads.recording import (
    RecordingOptions,
    export_lines,
    load_recording,
    qemu_reset_pushes,
)
from mtrremu.workloads.trace import Trace, TraceFormatError, save
from tests.helpers import run_ab, run_mtrremu

#: Two vCPUs: each programs the MTRRs with CD=1, the BSP alone then both at once (a burst),
#: with a write the host faulted (a reserved type in PHYSBASE0) and unrelated events between.
FTRACE = """\
# tracer: nop
#
# entries-in-buffer/entries-written: 20/20   #P:16
CPU 0/KVM-16856 [007] ....... 380.398600: kvm_entry: vcpu 0, rip 0xfff0
CPU 0/KVM-16856 [007] ....... 380.398650: kvm_exit: vcpu 0 reason CR_ACCESS rip 0xfe05b \
info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000
CPU 0/KVM-16856 [007] ....... 380.398696: kvm_cr: cr_write 0 = 0x10
CPU 0/KVM-16856 [007] ....... 380.398800: kvm_msr: msr_read fe = 0x508
CPU 0/KVM-16856 [007] ....... 380.398900: kvm_msr: msr_write 1b = 0xfee00900
CPU 0/KVM-16856 [007] ....... 380.399000: kvm_msr: msr_write 200 = 0x2 (#GP)
CPU 0/KVM-16856 [007] ....... 380.399100: kvm_msr: msr_write 250 = 0x606060606060606
CPU 0/KVM-16856 [007] ....... 380.399200: kvm_msr: msr_write 2ff = 0xc06
CPU 0/KVM-16856 [007] ....... 380.399300: kvm_pio: pio_write at 0x402 size 1 count 1 val 0x41
CPU 1/KVM-16857 [003] ....... 380.500000: kvm_cr: cr_write 0 = 0x10
CPU 0/KVM-16856 [007] ....... 380.500002: kvm_cr: cr_write 0 = 0x40000010
CPU 1/KVM-16857 [003] ....... 380.500004: kvm_msr: msr_write 2ff = 0x0
CPU 0/KVM-16856 [007] ....... 380.500006: kvm_msr: msr_write 2ff = 0x0
CPU 1/KVM-16857 [003] ....... 380.500008: kvm_msr: msr_write 2ff = 0xc06
CPU 0/KVM-16856 [007] ....... 380.500010: kvm_msr: msr_write 2ff = 0xc06
CPU 0/KVM-16856 [007] ....... 380.500012: kvm_cr: cr_write 0 = 0x10
CPU 1/KVM-16857 [003] ....... 380.600000: kvm_msr: msr_write 277 = 0x7040600070406
CPU 1/KVM-16857 [003] ....... 380.600100: kvm_cr: cr_read 0 = 0x10
"""


def _perf(ftrace: str) -> str:
    """The same events as ``perf script`` prints them; vCPU 1's thread unnamed (a VMM that
    does not name its threads), so its vCPU comes from kvm_entry."""
    out: list[str] = []
    for line in ftrace.splitlines():
        if line.startswith("#"):
            continue
        thread, rest = line.split("-", 1)
        pid, cpu, _, seconds, event = rest.split(" ", 4)
        if thread == "CPU 1/KVM":
            thread = "vcpu-thread"
            if not out or "vcpu-thread" not in out[-1]:
                out.append(f"vcpu-thread {pid} {cpu} {seconds} kvm:kvm_entry: vcpu 1, rip 0x0")
        out.append(f"{thread} {pid} {cpu} {seconds} kvm:{event}")
    return "\n".join(out) + "\n"


def _equivalent() -> Trace:
    """What FTRACE stands for, built by hand: QEMU's pushes, then the guest writes."""
    config = VmConfig(vcpus=2, memslots=q35(16 << 30), noncoherent_dma=1)
    items = [
        *qemu_reset_pushes(2),
        WriteCr0(0, 0x10),
        WriteMsr(0, 0x200, 0x2),
        WriteMsr(0, 0x250, 0x0606060606060606),
        WriteMsr(0, msrs.DEFTYPE, 0xC06),
        Burst(
            (
                (1, (WriteCr0(1, 0x10), WriteMsr(1, 0x2FF, 0), WriteMsr(1, 0x2FF, 0xC06))),
                (
                    0,
                    (
                        WriteCr0(0, 0x40000010),
                        WriteMsr(0, 0x2FF, 0),
                        WriteMsr(0, 0x2FF, 0xC06),
                        WriteCr0(0, 0x10),
                    ),
                ),
            ),
            0,
        ),
        WriteMsr(1, msrs.PAT, 0x7040600070406),
    ]
    return Trace("hand", config, tuple(items))


COMPARED = ("zap_events", "zaps_executed", "ranges_requested", "duplicates_dropped", "tlb_flushes")


@pytest.mark.parametrize("text_format", ["ftrace", "perf"])
def test_a_hand_written_recording_counts_as_its_json_lines_trace(
    text_format: str, tmp_path: Path
) -> None:
    recording = tmp_path / f"host.{text_format}"
    recording.write_text(FTRACE if text_format == "ftrace" else _perf(FTRACE))
    jsonl = tmp_path / "hand.jsonl"
    save(_equivalent(), jsonl)
    imported = load_recording(recording, RecordingOptions())
    assert list(imported.items) == list(_equivalent().items)
    assert imported.host_faults == frozenset({(0, 0)})
    for strategy in ("kvm-6.5", "zap-all", "fine-grained"):
        ours = run(
            RunSpec("host", strategy, trace_file=str(recording), recording=RecordingOptions())
        )
        reference = run(RunSpec("hand", strategy, trace_file=str(jsonl)))
        assert {k: ours["counters"][k] for k in COMPARED} == {
            k: reference["counters"][k] for k in COMPARED
        }
        assert ours["counters"]["zap_events"] > 0
        # The host faulted the reserved type, and so does the emulator.
        assert ours["host_disagreements"] == {"count": 0, "first": None}
        assert reference["host_disagreements"] is None


def test_a_write_the_host_faulted_and_we_accept_is_reported(tmp_path: Path) -> None:
    recording = tmp_path / "host.txt"
    recording.write_text(
        FTRACE.replace(
            "msr_write 250 = 0x606060606060606", "msr_write 250 = 0x606060606060606 (#GP)"
        )
    )
    found = run(RunSpec("host", "zap-all", trace_file=str(recording), recording=RecordingOptions()))
    assert found["host_disagreements"]["count"] == 1
    assert "vCPU 0 guest MSR write #1 (0x250" in found["host_disagreements"]["first"]
    assert "host #GP, emulator accepted" in found["host_disagreements"]["first"]


@pytest.mark.parametrize("workload", ["W1", "W2"])
@pytest.mark.parametrize("text_format", ["ftrace", "perf"])
def test_export_then_import_keeps_the_zap_counts(
    workload: str, text_format: str, tmp_path: Path
) -> None:
    recording = tmp_path / f"{workload}.txt.gz"
    with gzip.open(recording, "wt") as out:
        out.writelines(line + "\n" for line in export_lines(build(workload), text_format))
    for strategy, published in {
        "W1": (("kvm-6.5", 50), ("zap-all", 42)),
        "W2": (("kvm-6.5", 84), ("zap-all", 74)),
    }[workload]:
        imported = run(
            RunSpec(workload, strategy, trace_file=str(recording), recording=RecordingOptions())
        )
        assert imported["counters"]["zap_events"] == published
        assert imported["verdict"] == "clean"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("CPU 0/KVM-16856 [007] ....... 380.4: kvm_msr: msr_write 2ff =", "not a kvm_msr message"),
        (
            "CPU 0/KVM-16856 [007] ....... 380.4: kvm_cr: cr_write zero = 0x10",
            "not a kvm_cr message",
        ),
        ("garbage kvm_msr: msr_write 2ff = 0x0", "without the tracer's prefix"),
        ("qemu-16856 [007] ....... 380.4: kvm_msr: msr_write 2ff = 0x0", "cannot tell the vCPU"),
    ],
)
def test_a_malformed_line_names_its_number(line: str, why: str, tmp_path: Path) -> None:
    recording = tmp_path / "bad.txt"
    recording.write_text(FTRACE + line + "\n")
    with pytest.raises(TraceFormatError) as caught:
        load_recording(recording, RecordingOptions(format="ftrace"))
    assert caught.value.line == FTRACE.count("\n") + 1
    assert why in caught.value.why


def test_the_cli_exports_replays_and_refuses_with_the_line(tmp_path: Path) -> None:
    recording = tmp_path / "w1.perf"
    exported = run_mtrremu("export", "-w", "W1", "--format", "perf", "-o", str(recording))
    assert exported.returncode == 0, exported.stderr
    replayed = run_ab("--recording", str(recording), "-s", "zap-all", out=tmp_path / "ab")
    assert replayed.returncode == 0, replayed.stderr
    assert '"zap_events": 42' in (tmp_path / "ab" / "ab.jsonl").read_text()
    bad = tmp_path / "bad.txt"
    bad.write_text(FTRACE + "CPU 0/KVM-1 [000] .... 1.0: kvm_msr: msr_write 2ff = 0xzz\n")
    refused = run_ab("--recording", str(bad), "-s", "zap-all", out=tmp_path / "ab2")
    assert refused.returncode == 2
    assert f"{bad}:{FTRACE.count(chr(10)) + 1}: not a kvm_msr message" in refused.stderr
    assert "Traceback" not in refused.stderr


def _long_recording(path: Path, writes: int) -> None:
    with path.open("w") as out:
        for n in range(writes):
            vcpu, value = n % 4, 0xC06 if n % 8 < 4 else 0
            prefix = f"CPU {vcpu}/KVM-{100 + vcpu} [00{vcpu}] ....... "
            prefix += f"{10 + n // 1000}.{(n % 1000) * 100:06d}: "
            out.write(f"{prefix}kvm_msr: msr_write 2ff = {value:#x}\n")
            out.write(f"{prefix}kvm_exit: vcpu {vcpu} reason MSR_WRITE\n")


def test_a_long_recording_imports_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every chunk spooled, importing three times as many lines may not cost noticeably
    more (scripts/bench_ab.py --recording replays a 1,000,000-line one)."""
    monkeypatch.setattr(columns, "MEMORY_BYTES", 0)
    monkeypatch.setattr(columns, "CHUNK_ROWS", 1024)
    peaks = []
    for count in (2000, 6000, 18000):  # the first warms up: not compared
        path = tmp_path / f"{count}.txt"
        _long_recording(path, count)
        gc.collect()
        tracemalloc.start()
        trace = load_recording(path, RecordingOptions(vmm="none"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(trace.items) == count
    assert peaks[2] < 1.25 * peaks[1], peaks


def test_memory_gives_a_recording_its_ram() -> None:
    plan = Plan(workloads=(), recordings=["x.txt"], strategies=["zap-all"], memory=[4 << 30])
    (spec,) = plan.specs()
    assert spec.recording == RecordingOptions(ram_bytes=4 << 30)
