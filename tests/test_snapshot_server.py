"""Snapshots through a real server: ExportVm/ImportVm over gRPC, the CLI, and the state
directory, including a server killed with SIGKILL under load and restarted from it."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from mtrremu.ab.runner import server_process
from mtrremu.client import Client, RemoteVm
from mtrremu.core import msrs
from mtrremu.core.config import VmConfig
from mtrremu.core.errors import InvalidArgument, InvalidSnapshot, ResourceExhausted, UnknownVm
from mtrremu.core.vm_state import VmState
from mtrremu.server.limits import Limits
from mtrremu.server.state_dir import StateDirSettings
from mtrremu.snapshot import SUFFIX, read_snapshot, read_snapshot_file
from tests.helpers import CD0, GIB, MIB, q35_slots, run_mtrremu, serving


def busy_vm(client: Client, strategy: str = "fine-grained") -> RemoteVm:
    """A VM with MTRRs programmed, memory faulted in and some zaps behind it."""
    vm = client.create_vm(VmConfig(vcpus=2, noncoherent_dma=1, memslots=q35_slots(4)), strategy)
    for vcpu in (0, 1):
        vm.write_msr(vcpu, msrs.DEFTYPE, 0xC06)
        vm.write_msr(vcpu, msrs.PHYSBASE0, 0xC0000000)
        vm.write_msr(vcpu, msrs.PHYSBASE0 + 1, 0xFC0000800)
        vm.write_cr0(vcpu, CD0)
    vm.fault_range(0, 0, 2 * GIB)
    vm.access(1, 0xFEC00000)
    return vm


def state_of(vm: RemoteVm) -> VmState:
    return read_snapshot(io.BytesIO(vm.export()))


def same_but_id(a: VmState, b: VmState) -> bool:
    return dataclasses.replace(a, vm_id=b.vm_id).same_as(b)


def test_an_imported_vm_is_the_exported_one_under_a_new_id() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        vm = busy_vm(client, "lazy")
        data = vm.export()
        copy = client.import_vm(data)
        assert copy.vm_id != vm.vm_id
        assert same_but_id(state_of(copy), state_of(vm))
        assert list(copy.dump_leaves()) == list(vm.dump_leaves())
        # Both answer the next operations alike.
        for target in (vm, copy):
            target.write_msr(0, msrs.DEFTYPE, 0xC00)
        assert copy.access(0, 0x1000) == vm.access(0, 0x1000)
        assert copy.counters() == vm.counters()


def test_a_bad_snapshot_creates_nothing_and_says_why() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        data = busy_vm(client).export()
        before = len(client.list_vms())
        damaged = bytearray(data)
        damaged[len(data) // 2] ^= 0x10
        for bad, why in (
            (data[: len(data) // 2], "truncated"),
            (bytes(damaged), "checksum mismatch"),
            (b"", "too short"),
            (b"PK\x03\x04" + b"\0" * 200, "checksum"),
        ):
            with pytest.raises(InvalidSnapshot, match=why):
                client.import_vm(bad)
        assert len(client.list_vms()) == before
        assert client.health() == "SERVING"
        with pytest.raises(UnknownVm):
            client.vm("vm-none").export()


def test_a_snapshot_over_the_size_limit_is_refused_as_it_arrives() -> None:
    limits = Limits(max_snapshot_bytes=1024)
    with serving(limits=limits) as server, Client(server.addresses[0]) as client:
        data = busy_vm(client).export()
        assert len(data) > 1024
        with pytest.raises(ResourceExhausted, match="1024"):
            client.import_vm(data)
        assert len(client.list_vms()) == 1


def test_an_import_respects_the_memory_limits() -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        data = busy_vm(client).export()
    limits = Limits(max_vm_memory_bytes=GIB)
    with (
        serving(limits=limits) as small,
        Client(small.addresses[0]) as client,
        pytest.raises(ResourceExhausted, match="per VM"),
    ):
        client.import_vm(data)


def test_a_server_with_a_key_signs_and_requires_signatures() -> None:
    with serving() as plain, Client(plain.addresses[0]) as client:
        unsigned = busy_vm(client).export()
    with serving(snapshot_key=b"k1") as signed, Client(signed.addresses[0]) as client:
        with pytest.raises(InvalidSnapshot, match="requires a signature"):
            client.import_vm(unsigned)
        mine = busy_vm(client).export()
        assert mine[-80:-64].strip() == b"hmac-sha256"
        client.import_vm(mine)
    with (
        serving(snapshot_key=b"k2") as other,
        Client(other.addresses[0]) as client,
        pytest.raises(InvalidSnapshot, match="checksum mismatch"),
    ):
        client.import_vm(mine)


# -- the state directory (in-process servers) ----------------------------------------------


def test_a_restarted_server_has_its_vms_back(tmp_path: Path) -> None:
    settings = StateDirSettings(tmp_path, interval_seconds=3600)
    with serving(state_dir=settings) as server, Client(server.addresses[0]) as client:
        kept = [busy_vm(client, s) for s in ("fine-grained", "zap-all-shared", "lazy")]
        gone = busy_vm(client)
        states = {vm.vm_id: state_of(vm) for vm in kept}
        gone.delete()
    # Shutdown wrote them all; the deleted one's file went with it.
    assert sorted(p.name for p in tmp_path.glob(f"*{SUFFIX}")) == sorted(
        f"{vm_id}{SUFFIX}" for vm_id in states
    )
    with serving(state_dir=settings) as server, Client(server.addresses[0]) as client:
        assert sorted(v.vm_id for v in client.list_vms()) == sorted(states)
        for vm_id, state in states.items():
            assert state_of(client.vm(vm_id)).same_as(state)


def test_one_server_per_state_directory(tmp_path: Path) -> None:
    settings = StateDirSettings(tmp_path)
    with (
        serving(state_dir=settings),
        pytest.raises(InvalidArgument, match="in use by another server"),
        serving(state_dir=settings),
    ):
        pass


def test_a_file_that_cannot_be_restored_is_set_aside(tmp_path: Path) -> None:
    settings = StateDirSettings(tmp_path, interval_seconds=3600)
    with serving(state_dir=settings) as server, Client(server.addresses[0]) as client:
        good, bad = busy_vm(client), busy_vm(client)
    broken = tmp_path / f"{bad.vm_id}{SUFFIX}"
    broken.write_bytes(broken.read_bytes()[:-100])
    leftover = tmp_path / f".{good.vm_id}{SUFFIX}.x1y2.tmp"
    leftover.write_bytes(b"half a file")
    with serving(state_dir=settings) as server, Client(server.addresses[0]) as client:
        assert [v.vm_id for v in client.list_vms()] == [good.vm_id]
    assert not broken.exists() and broken.with_name(broken.name + ".rejected").exists()
    assert not leftover.exists()


def test_periodic_snapshots_write_only_the_vms_that_changed(tmp_path: Path) -> None:
    settings = StateDirSettings(tmp_path, interval_seconds=3600)
    with serving(state_dir=settings) as server, Client(server.addresses[0]) as client:
        state_dir = server.state_dir
        assert state_dir is not None
        first, second = busy_vm(client), busy_vm(client)
        assert state_dir.save() == 2
        assert state_dir.save() == 0
        first.access(0, 0x1000)
        assert state_dir.save() == 1
        assert read_snapshot_file(state_dir.path(first.vm_id)).counters == first.counters()
        # A write with nothing to report (a PAT write never zaps) is a change all the same.
        second.write_msr(1, msrs.PAT, 0x0606060606060606)
        assert state_dir.save() == 1
        saved = read_snapshot_file(state_dir.path(second.vm_id))
        assert saved.same_as(state_of(second))


# -- kill -9 -------------------------------------------------------------------------------


def test_kill_9_under_load_loses_no_snapshotted_vm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    flags = ("--state-dir", str(state), "--snapshot-interval", "0.2")
    stop = threading.Event()
    with server_process(tmp_path, *flags) as (process, target):
        with Client(target) as client:
            vms = [busy_vm(client, s) for s in ("fine-grained", "zap-all", "lazy", "kvm-6.5")]
            initial = {vm.vm_id: vm.counters() for vm in vms}

        def load(vm_id: str) -> None:
            with Client(target, timeout=5) as client:
                vm = client.vm(vm_id)
                page = 0
                while not stop.is_set():
                    try:
                        vm.write_msr(0, msrs.DEFTYPE, 0xC06 if page % 2 else 0xC00)
                        vm.fault_range(1, page * 2 * MIB, (page + 1) * 2 * MIB)
                    except (grpc.RpcError, UnknownVm, OSError):
                        return  # the server is gone
                    page = (page + 1) % 1024

        threads = [threading.Thread(target=load, args=(vm.vm_id,)) for vm in vms]
        for thread in threads:
            thread.start()
        deadline = threading.Event()
        while not all((state / f"{vm.vm_id}{SUFFIX}").exists() for vm in vms):
            assert not deadline.wait(0.1) and process.poll() is None
        deadline.wait(0.5)  # a few more rounds, each replacing files under load
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        stop.set()
        for thread in threads:
            thread.join(30)
    on_disk = {p.stem: read_snapshot_file(p) for p in state.glob(f"*{SUFFIX}")}
    assert sorted(on_disk) == sorted(vm.vm_id for vm in vms)
    # The files were written under load: they hold work done after the VMs were set up.
    assert any(kept.counters != initial[vm_id] for vm_id, kept in on_disk.items())
    with server_process(tmp_path, *flags) as (_, target), Client(target) as client:
        assert sorted(v.vm_id for v in client.list_vms()) == sorted(on_disk)
        for vm_id, kept in on_disk.items():
            assert state_of(client.vm(vm_id)).same_as(kept), vm_id


# -- the command line ----------------------------------------------------------------------


def test_the_cli_exports_imports_and_checks(tmp_path: Path) -> None:
    with serving() as server, Client(server.addresses[0]) as client:
        vm = busy_vm(client)
        file = tmp_path / "vm.mtrsnap"
        done = run_mtrremu(
            "snapshot", "export", "--server", server.addresses[0], vm.vm_id, str(file)
        )
        assert done.returncode == 0, done.stderr
        check = run_mtrremu("snapshot", "check", str(file))
        assert check.returncode == 0 and vm.vm_id in check.stdout
        done = run_mtrremu("snapshot", "import", "--server", server.addresses[0], str(file))
        assert done.returncode == 0, done.stderr
        new_id = done.stdout.strip()
        assert same_but_id(state_of(client.vm(new_id)), state_of(vm))
    file.write_bytes(file.read_bytes()[:-1])
    check = run_mtrremu("snapshot", "check", str(file))
    assert check.returncode == 2
    assert check.stderr.startswith("mtrremu: ") and "Traceback" not in check.stderr
    missing = run_mtrremu("snapshot", "check", str(tmp_path / "none"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


WRITER = """
import sys
from pathlib import Path
from mtrremu.core import msrs
from mtrremu.core.config import Memslot, VmConfig
from mtrremu.core.units import GIB, Level
from mtrremu.core.vm_state import capture
from mtrremu.plugin.manager import PluginManager
from mtrremu.snapshot import write_snapshot_file

config = VmConfig(
    noncoherent_dma=1, memslots=(Memslot.from_bytes(0, 8 * GIB),), max_mapping_level=Level.K4
)
vm = PluginManager(entry_points=False).create_vm(config, "fine-grained")
vm.write_msr(0, msrs.DEFTYPE, 0xC06)
vm.fault_range(0, 0, 8 * GIB)
path = Path(sys.argv[1])
print("ready", flush=True)
generation = 0
while True:  # rewrite the same file until killed, each time a little different
    generation += 1
    vm.write_msr(0, msrs.PAT, 0x0007040600070406 if generation % 2 else msrs.PAT_DEFAULT)
    write_snapshot_file(path, capture(vm, {}, "default"))
"""


def test_a_crash_mid_write_leaves_the_previous_snapshot_whole(tmp_path: Path) -> None:
    """A process rewriting a 2 Mi-leaf snapshot is killed at random moments: the file is
    always a whole, valid snapshot (the old one or the new one), never a partial one."""
    path = tmp_path / f"vm{SUFFIX}"
    rng = random.Random(5)
    interrupted = 0
    for _ in range(6):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE
        )
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        threading.Event().wait(rng.uniform(0.05, 0.6))
        process.kill()
        process.wait(30)
        leftovers = list(tmp_path.glob(f".{path.name}.*.tmp"))
        interrupted += bool(leftovers)
        for leftover in leftovers:  # what the state directory's restore clears
            leftover.unlink()
        if path.exists():
            assert read_snapshot_file(path).leaf_total == 2 << 20
    assert path.exists()
    assert interrupted, "no kill landed in the middle of a write: the test proved nothing"
