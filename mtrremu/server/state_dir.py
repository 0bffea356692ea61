"""``serve --state-dir``: every VM kept as a snapshot file, so a restarted server has them back.

The directory holds one ``<vm id>.mtrsnap`` per VM (docs/snapshots.md#state-directory). Files
are written atomically, each interval for the VMs that changed and for every VM at shutdown,
and deleted with their VM. At start every file is restored under its VM's id; a file that
cannot be is renamed ``*.rejected`` (kept for the operator, never loaded again) and logged. A
lock file keeps a second server off the same directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from mtrremu.core.errors import InvalidArgument, MtrremuError
from mtrremu.core.vm_state import capture
from mtrremu.server.limits import VmTable
from mtrremu.snapshot import SUFFIX, read_snapshot_file, write_snapshot_file

log = logging.getLogger("mtrremu.server.state")
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class StateDirSettings:
    directory: Path
    #: Seconds between two rounds of snapshots of the VMs that changed.
    interval_seconds: float = 60.0
    #: Sign snapshots with it and require the signature when restoring.
    key: bytes | None = None

    def __post_init__(self) -> None:
        if not self.interval_seconds > 0:
            raise InvalidArgument("the snapshot interval must be a positive number of seconds")


class StateDir:
    """The state directory of one server, holding the VMs of ``table``."""

    def __init__(self, settings: StateDirSettings, table: VmTable) -> None:
        self.settings = settings
        self.table = table
        self.directory = settings.directory
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise InvalidArgument(
                f"cannot use {self.directory} as the state directory: {error.strerror}"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise InvalidArgument(
                f"the state directory {self.directory} is in use by another server"
            ) from None
        #: Per VM id: the VM's change count when its file was last written.
        self._saved: dict[str, int] = {}
        #: Serialises writing and deleting files (a deleted VM's file is never written again).
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        table.on_deleted = self.forget

    def path(self, vm_id: str) -> Path:
        return self.directory / f"{vm_id}{SUFFIX}"

    def restore(self) -> list[str]:
        """Load every snapshot of the directory; returns the ids restored. Leftover
        temporary files of an interrupted write are removed."""
        for leftover in self.directory.glob(f".*{SUFFIX}.*.tmp"):
            leftover.unlink(missing_ok=True)
        restored = []
        files = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: (p.stat().st_mtime, p.name))
        for path in files:
            try:
                state = read_snapshot_file(path, self.settings.key)
                if path.name != f"{state.vm_id}{SUFFIX}":
                    raise InvalidArgument(f"it holds VM {state.vm_id!r}, not {path.stem!r}")
                entry = self.table.create(
                    state.config,
                    state.strategy,
                    state.options,
                    lambda entry: True,
                    state=state,
                    vm_id=state.vm_id,
                    owner=state.owner,
                )
            except (MtrremuError, OSError) as error:
                rejected = path.with_name(path.name + ".rejected")
                path.replace(rejected)
                log.error("cannot restore %s (%s); moved to %s", path.name, error, rejected.name)
                continue
            self._saved[state.vm_id] = entry.vm.changes
            restored.append(state.vm_id)
        log.info("restored %d VMs from %s", len(restored), self.directory)
        return restored

    def save(self) -> int:
        """Write the snapshot of every VM that changed since its last one (the others' files
        are current); returns how many were written. A VM that cannot be captured now (it
        does not come to rest) keeps its previous file and is tried again next round."""
        written = 0
        for entry in self.table.entries():
            vm = entry.vm
            changes = vm.changes
            if self._saved.get(vm.vm_id) == changes:
                continue
            with self._io:
                if vm.closed:
                    continue
                try:
                    state = capture(vm, entry.options, entry.owner)
                    write_snapshot_file(self.path(vm.vm_id), state, self.settings.key)
                except (MtrremuError, OSError) as error:
                    log.error("cannot snapshot VM %s: %s", vm.vm_id, error)
                    continue
                self._saved[vm.vm_id] = changes
                written += 1
        return written

    def forget(self, vm_id: str) -> None:
        """A VM was deleted: delete its file."""
        with self._io:
            self._saved.pop(vm_id, None)
            self.path(vm_id).unlink(missing_ok=True)

    def start(self) -> None:
        """Snapshot the VMs that changed every interval, on a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="mtrremu-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_seconds):
            self.save()

    def close(self) -> None:
        """Stop the periodic snapshots, write every VM changed since its last one, release
        the directory."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        written = self.save()
        log.info("wrote %d VM snapshots to %s", written, self.directory)
        self.release()

    def release(self) -> None:
        """Let another server use the directory."""
        os.close(self._lock_fd)
