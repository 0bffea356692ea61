"""Snapshots in-process: the round trip of random states, and every corruption refused.

The round trip is a property: random operations (every kind, valid and refused) on a VM of a
random strategy, then capture → file → read → restore into a new VM must give a state equal
field for field (the EPT's every table and entry included), and the two VMs must then answer
the same further operations identically. The corruption list is generated from a real
snapshot: truncation at every boundary of the archive's sections, single-bit flips spread over
the whole file, a newer format version, a wrong checksum, signature mismatches, and contents
re-written with a valid checksum but a state the emulator could not have reached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import random
import threading
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mtrremu_strategies.series import FineGrained

from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.errors import InvalidSnapshot, MtrremuError, UnknownStrategy
from mtrremu.core.events import EventResult
from mtrremu.core.units import Level
from mtrremu.core.vm import Vm
from mtrremu.core.vm_state import VmState, capture, restore
from mtrremu.plugin import Profile, StrategySpec, VmView, ZapDecision, hookimpl
from mtrremu.plugin.manager import PluginManager
from mtrremu.snapshot import read_snapshot, write_snapshot
from tests.helpers import ALL_STRATEGIES, CD0, CD1, GIB, MIB, create_vm, gfn
from tests.test_stateful import CR0_VALUES, DEFTYPES, GFNS, LENGTHS, RANGE_WRITES, SLOTS

MANAGER = PluginManager(entry_points=False)
#: An edit of a snapshot's members (name → content), in place.
Edit = Callable[[dict[str, bytes]], object]
Array = npt.NDArray[Any]
OPS = st.one_of(
    st.tuples(st.just("msr"), st.integers(0, 2), RANGE_WRITES, st.booleans()),
    st.tuples(st.just("deftype"), st.integers(0, 2), DEFTYPES),
    st.tuples(st.just("cr0"), st.integers(0, 2), CR0_VALUES, st.booleans()),
    st.tuples(st.just("pat"), st.integers(0, 2), st.sampled_from([0x0007040600070406, 1 << 3])),
    st.tuples(st.just("access"), st.integers(0, 2), GFNS),
    st.tuples(st.just("fault"), st.integers(0, 2), GFNS, LENGTHS),
    st.tuples(st.just("mmio"), st.integers(0, 2), st.integers(gfn(16 * GIB), gfn(20 * GIB))),
    st.tuples(st.sampled_from(["attach", "detach"])),
    st.tuples(st.sampled_from(["reset", "init"]), st.integers(0, 2)),
)


def apply(vm: Vm, op: tuple[object, ...]) -> EventResult | str:
    """One operation; a refusal is its error's reason."""
    kind, *args = op
    try:
        match kind, args:
            case "msr", [int(v), (int(msr), int(value)), bool(host)]:
                return vm.write_msr(v, msr, value, host=host)
            case "deftype", [int(v), int(value)]:
                return vm.write_msr(v, msrs.DEFTYPE, value)
            case "cr0", [int(v), int(value), bool(host)]:
                return vm.write_cr0(v, value, host=host)
            case "pat", [int(v), int(value)]:
                return vm.write_msr(v, msrs.PAT, value)
            case "access" | "mmio", [int(v), int(page)]:
                return vm.access(v, page << 12)
            case "fault", [int(v), int(page), int(pages)]:
                end = min(page + pages, gfn(8 * GIB))
                return vm.fault_range(v, page << 12, max(end, page + 1) << 12)
            case "attach", []:
                return vm.attach_dma()
            case "detach", []:
                return vm.detach_dma()
            case "reset", [int(v)]:
                return vm.reset(v)
            case "init", [int(v)]:
                return vm.init(v)
    except MtrremuError as error:
        return error.reason
    raise AssertionError(op)


def new_vm(strategy: str, vcpus: int, track: bool) -> Vm:
    config = VmConfig(vcpus=vcpus, noncoherent_dma=1, memslots=SLOTS, track_staleness=track)
    return create_vm(config, strategy)


def snapshot_bytes(state: VmState, key: bytes | None = None) -> bytes:
    out = io.BytesIO()
    write_snapshot(state, out, key)
    return out.getvalue()


def loaded(data: bytes, key: bytes | None = None) -> VmState:
    return read_snapshot(io.BytesIO(data), key)


def restored(state: VmState) -> Vm:
    vm = MANAGER.create_vm(state.config, state.strategy, state.options, vm_id=state.vm_id)
    restore(vm, state)
    return vm


def outcome(result: EventResult | str) -> object:
    """What an operation answered, comparable across VMs."""
    if isinstance(result, str):
        return result
    zap = result.zap
    return (
        result.counters,
        result.gp,
        None
        if zap is None
        else (
            dataclasses.replace(zap, tickets=[]),
            [(t.range, t.drained, t.discarded) for t in zap.tickets],  # tickets are identities
        ),
        result.value,
        result.access,
        result.populate,
        result.cd_toggled,
        result.strategy_failure,
    )


@given(
    strategy=st.sampled_from(ALL_STRATEGIES),
    vcpus=st.integers(1, 3),
    track=st.booleans(),
    before=st.lists(OPS, max_size=30),
    after=st.lists(OPS, max_size=15),
)
def test_a_restored_vm_is_the_same_vm(
    strategy: str,
    vcpus: int,
    track: bool,
    before: list[tuple[object, ...]],
    after: list[tuple[object, ...]],
) -> None:
    original = new_vm(strategy, vcpus, track)
    for op in before:
        apply(original, op)
    state = capture(original, {}, "default")
    copy = restored(loaded(snapshot_bytes(state)))
    assert capture(copy, {}, "default").same_as(state)
    for op in after:
        assert outcome(apply(copy, op)) == outcome(apply(original, op)), op
    assert capture(copy, {}, "default").same_as(capture(original, {}, "default"))


def test_the_ept_image_holds_zapped_mmio_and_marked_entries() -> None:
    """The parts of an EPT that no lookup of a present leaf shows survive too."""
    vm = new_vm("lazy", 1, False)
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, 2 * GIB)
    vm.access(0, 16 * GIB)  # outside every memslot: an MMIO marker
    vm.write_msr(0, msrs.DEFTYPE, 0xC00)  # lazy marks instead of zapping
    copy = restored(loaded(snapshot_bytes(capture(vm, {}, "default"))))
    for gpa in (0, MIB, 16 * GIB):
        assert copy.lookup(gpa) == vm.lookup(gpa)
    assert copy.lookup(16 * GIB).mmio and copy.lookup(0).recalc_pending
    other = new_vm("zap-all", 1, False)
    other.write_cr0(0, CD0)
    other.fault_range(0, 0, 2 * GIB)
    other.write_cr0(0, CD1)  # zaps everything: zapped entries remember it for refaults
    back = restored(loaded(snapshot_bytes(capture(other, {}, "default"))))
    assert back.lookup(0).zapped
    assert back.access(0, 0).counters.refaults == other.access(0, 0).counters.refaults == 1


# -- corruption --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state() -> VmState:
    vm = new_vm("fine-grained", 2, True)
    vm.write_cr0(0, CD0)
    vm.write_msr(0, msrs.DEFTYPE, 0xC06)
    vm.fault_range(0, 0, 4 * GIB)
    vm.access(1, 16 * GIB)
    return capture(vm, {}, "default")


@pytest.fixture(scope="module")
def data(state: VmState) -> bytes:
    return snapshot_bytes(state)


def refused(data: bytes, key: bytes | None = None) -> str:
    """Why reading ``data`` and loading it into a new VM fails: its reason and message."""
    with pytest.raises(MtrremuError) as caught:
        restored(loaded(data, key))
    return f"{caught.value.reason}: {caught.value}"


def section_boundaries(data: bytes) -> list[int]:
    """Offsets where the archive's sections start: each member's local header and data, the
    central directory, its end record and the checksum."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        offsets = {0, len(data) - 80, len(data) - 1, len(data) - 22 - 80}
        for info in infos:
            offsets.add(info.header_offset)
            name_and_extra = 30 + len(info.filename.encode()) + len(info.extra)
            offsets.add(info.header_offset + name_and_extra)
        central = data.rfind(b"PK\x01\x02", 0, len(data) - 80)
        offsets.add(data.find(b"PK\x01\x02"))
        offsets.add(central)
    return sorted(o for o in offsets if 0 <= o < len(data))


def test_truncation_at_every_section_boundary_is_refused(data: bytes) -> None:
    boundaries = section_boundaries(data)
    assert len(boundaries) > 20  # every member's two sections, and the archive's own
    for cut in boundaries:
        assert refused(data[:cut])


def test_every_single_bit_flip_is_refused(data: bytes) -> None:
    rng = random.Random(7)
    positions = sorted(
        {*range(0, len(data), max(1, len(data) // 400)), *range(len(data) - 120, len(data))}
    )
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        assert refused(bytes(damaged)), position


def rewritten(
    data: bytes,
    edit: Edit,
    key: bytes | None = None,
    *,
    sizes: bool = True,
) -> bytes:
    """The snapshot with its members edited, re-archived and given a correct checksum,
    computed here from the documented format (not by the code under test). ``sizes``: the
    manifest lists the edited members' sizes."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    edit(members)
    if sizes:
        manifest = json.loads(members["manifest.json"])
        manifest["members"] = {n: len(c) for n, c in members.items() if n != "manifest.json"}
        members["manifest.json"] = json.dumps(manifest).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        archive.comment = b" " * 80
    body = out.getvalue()[:-80]
    if key is None:
        scheme, digest = "sha256", hashlib.sha256(body).hexdigest()
    else:
        scheme, digest = "hmac-sha256", hmac.new(key, body, hashlib.sha256).hexdigest()
    return body + scheme.ljust(16).encode() + digest.encode()


def test_the_rewriting_helper_itself_makes_valid_snapshots(data: bytes, state: VmState) -> None:
    assert loaded(rewritten(data, lambda members: None)).same_as(state)


def _json_edit(member: str, change: Callable[[Any], object]) -> Edit:
    def edit(members: dict[str, bytes]) -> None:
        document = json.loads(members[member])
        change(document)
        members[member] = json.dumps(document).encode()

    return edit


def _array_edit(name: str, change: Callable[[Array], Array]) -> Edit:
    def edit(members: dict[str, bytes]) -> None:
        array = np.load(io.BytesIO(members[name]))
        out = io.BytesIO()
        np.save(out, change(array.copy()))
        members[name] = out.getvalue()

    return edit


def _set(path: list[str | int], value: object) -> Callable[[Any], None]:
    def change(document: Any) -> None:
        for step in path[:-1]:
            document = document[step]
        document[path[-1]] = value

    return change


def _first_leaf_byte(value: int) -> Callable[[Array], Array]:
    def change(entries: Array) -> Array:
        row, col = (int(x[0]) for x in np.nonzero(entries >= 0x80))
        entries[row, col] = value
        return entries

    return change


TAMPERED: dict[str, tuple[Edit, str]] = {
    "a newer format version": (_json_edit("manifest.json", _set(["version"], 2)), "newer"),
    "another format": (_json_edit("manifest.json", _set(["format"], "zip")), "format"),
    "a missing member": (lambda m: m.pop("ept/level1.bases.npy"), "members"),
    "an extra member": (lambda m: m.update({"evil.py": b"print(1)"}), "members"),
    "state.json not JSON": (lambda m: m.update({"state.json": b"{"}), "JSON"),
    "a missing field": (_json_edit("state.json", lambda d: d.pop("counters")), "missing"),
    "an unknown strategy": (
        _json_edit("state.json", _set(["strategy"], "nope")),
        "UNKNOWN_STRATEGY",
    ),
    "an invalid config": (_json_edit("state.json", _set(["config", "vcpus"], 0)), "vcpus"),
    "a bool for an int": (_json_edit("state.json", _set(["noncoherent_dma"], True)), "int"),
    "a CR0 KVM refuses": (
        _json_edit("state.json", _set(["vcpus", 0, "cr0"], 0x20000000 | 0x10)),
        "CR0",
    ),
    "an MTRR KVM refuses": (
        _json_edit("state.json", _set(["vcpus", 1, "mtrrs", 0], 0x302)),
        "MTRR",
    ),
    "a pair order of an invalid pair": (
        _json_edit("state.json", _set(["vcpus", 0, "pair_order"], [3])),
        "pair",
    ),
    "a vCPU too many": (
        _json_edit("state.json", lambda d: _set(["vcpus"], [*d["vcpus"], d["vcpus"][0]])(d)),
        "vCPU",
    ),
    "a negative counter": (_json_edit("state.json", _set(["counters", "faults"], -1)), "negative"),
    "an MMIO budget overrun": (_json_edit("state.json", _set(["mmio_tables"], 10**9)), "MMIO"),
    "a leaf byte of an illegal type": (
        _array_edit("ept/level3.entries.npy", _first_leaf_byte(0x82)),
        "cannot stand",
    ),
    "an orphan table": (
        _array_edit("ept/level2.bases.npy", lambda b: b + 1),
        "points to",
    ),
    "two roots": (
        _array_edit("ept/level4.bases.npy", lambda b: np.array([0, 1 << 27], dtype=np.int64)),
        "at most 1 rows",
    ),
    "more tables than the memslots allow": (
        _array_edit("ept/level1.bases.npy", lambda b: np.arange(10**6, dtype=np.int64) * 512),
        "at most",
    ),
    "floats for bases": (
        _array_edit("ept/level1.bases.npy", lambda b: b.astype(np.float64)),
        "float64",
    ),
}


@pytest.mark.parametrize("case", TAMPERED, ids=str)
def test_a_tampered_snapshot_with_a_valid_checksum_is_refused(data: bytes, case: str) -> None:
    edit, why = TAMPERED[case]
    message = refused(rewritten(data, edit))
    assert why in message
    assert message.startswith((InvalidSnapshot.reason, UnknownStrategy.reason))


def test_a_member_of_another_size_than_the_manifest_says_is_refused(data: bytes) -> None:
    edit = _json_edit("manifest.json", _set(["members", "state.json"], 1))
    assert "not the size" in refused(rewritten(data, edit, sizes=False))


def test_a_wrong_checksum_is_refused(data: bytes) -> None:
    wrong = data[:-64] + hashlib.sha256(b"other").hexdigest().encode()
    assert "checksum mismatch" in refused(wrong)


def test_signatures_are_required_and_checked(data: bytes, state: VmState) -> None:
    key = b"operator secret"
    signed = snapshot_bytes(state, key)
    assert loaded(signed, key).same_as(state)
    assert "no key was given" in refused(signed)
    assert "requires a signature" in refused(data, key)
    assert "checksum mismatch" in refused(signed, b"another key")
    # An edit re-signed without the key (a plain checksum) does not pass a keyed reader.
    assert "requires a signature" in refused(rewritten(signed, lambda m: None), key)


def test_a_snapshot_keeps_the_strategy_options_and_the_oracle_log() -> None:
    vm = create_vm(VmConfig(noncoherent_dma=1, track_staleness=True), "kvm-6.5")
    vm.write_cr0(0, CD0)
    vm.access(0, 0)
    vm.write_cr0(0, CD1)  # released KVM's CD gap: excused by name in the log
    state = dataclasses.replace(capture(vm, {"events": "changed"}, "default"))
    back = loaded(snapshot_bytes(state))
    assert back.options == {"events": "changed"}
    assert back.staleness == vm.staleness and back.staleness.excused
    assert back.counters == vm.counters
    assert back.ept.entries[Level.ROOT].shape == (1, 512)


def test_a_mask_never_written_stays_unwritten_and_zaps_alike() -> None:
    """KVM stores a PhysMask never written as 0 and one written 0 with the bits above
    MAXPHYADDR: they read back alike, but a later PhysBase write zaps differently."""
    vm = create_vm(VmConfig(noncoherent_dma=1), "zap-all")
    vm.write_msr(0, msrs.DEFTYPE, 0xC06, host=True)
    vm.write_msr(0, msrs.PHYSBASE0 + 3, 0, host=True)  # pair 1's mask written 0; pair 0 never
    vm.write_cr0(0, CD0)
    copy = restored(loaded(snapshot_bytes(capture(vm, {}, "default"))))
    assert copy.vcpus[0].mtrr.masks == vm.vcpus[0].mtrr.masks
    for pair in (0, 1):
        for target in (vm, copy):
            target.fault_range(0, 0, 4 * GIB)
        ours, theirs = (
            outcome(t.write_msr(0, msrs.PHYSBASE0 + 2 * pair, 0x80000000, host=True))
            for t in (vm, copy)
        )
        assert ours == theirs


class _SlowDma(FineGrained):
    """fine-grained, whose DMA-transition hook waits to be let go (the test's window)."""

    entered = threading.Event()
    go = threading.Event()

    def on_dma_transition(self, vm: VmView, attached: bool) -> ZapDecision:
        _SlowDma.entered.set()
        _SlowDma.go.wait(10)
        return super().on_dma_transition(vm, attached)


class _SlowDmaPlugin:
    @hookimpl
    def mtrremu_strategies(self) -> list[StrategySpec]:
        return [StrategySpec("slow-dma", "test", Profile.KVM_6_7, lambda options: _SlowDma())]


def test_a_snapshot_waits_for_a_dma_transition_between_its_count_and_its_zaps() -> None:
    """A DMA transition runs on no vCPU: a snapshot taken after its count changed and before
    its zaps ran would keep leaves of the old types with the new count, stale for good."""
    manager = PluginManager(entry_points=False, plugins=[_SlowDmaPlugin()])
    vm = manager.create_vm(VmConfig(noncoherent_dma=1), "slow-dma")
    vm.write_msr(0, msrs.DEFTYPE, 0xC00, host=True)  # UC while honoured
    vm.write_cr0(0, CD0)
    vm.fault_range(0, 0, GIB)
    detach = threading.Thread(target=vm.detach_dma)
    detach.start()
    assert _SlowDma.entered.wait(10)
    states: list[VmState] = []
    taker = threading.Thread(target=lambda: states.append(capture(vm, {}, "default")))
    taker.start()
    taker.join(0.3)
    assert not states  # it waits for the transition's zaps
    _SlowDma.go.set()
    detach.join(10)
    taker.join(10)
    (state,) = states
    assert state.noncoherent_dma == 0 and state.leaf_total == 0  # the zap-all ran first
