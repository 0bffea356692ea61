"""The snapshot file: one VM's complete state in a zip archive (docs/snapshots.md).

Members: ``manifest.json`` (format name, version, writer, member sizes), ``state.json``
(:func:`mtrremu.core.vm_state.state_document`) and per EPT level two NumPy ``.npy`` arrays
(table bases, entry bytes). The archive comment holds a digest of every byte before it:
SHA-256, or HMAC-SHA-256 when a key is given, so any change to the file (a flipped bit, a
truncation, an edited member) is refused before anything is parsed. Readers bound every
allocation by the sizes the VM's configuration allows.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from mtrremu.core.config import VmConfig
from mtrremu.core.ept import EptImage, table_bound
from mtrremu.core.errors import InvalidSnapshot
from mtrremu.core.units import ENTRIES_PER_TABLE, Level
from mtrremu.core.vm import mmio_table_budget
from mtrremu.core.vm_state import VmState, parse_config, parse_state_document, state_document
from mtrremu.plugin.manager import own_version

FORMAT = "mtrremu-snapshot"
#: The format version this code writes and the newest it reads.
VERSION = 1
#: What snapshot files are called in a state directory.
SUFFIX = ".mtrsnap"
#: The archive comment: a digest scheme (padded to 16 bytes) and a 64-digit hex digest.
_SCHEME_BYTES, _DIGEST_HEX = 16, 64
_COMMENT_BYTES = _SCHEME_BYTES + _DIGEST_HEX
#: The smallest zip archive: its end record (22 bytes) with our comment.
_MIN_FILE_BYTES = 22 + _COMMENT_BYTES
_MANIFEST_MAX_BYTES = 64 * 1024
#: state.json's bound: 4096 vCPUs' registers and 32764 named memslots fit well within it.
_STATE_MAX_BYTES = 64 * 1024 * 1024
_CHUNK_BYTES = 1 << 20


def _member(level: Level, part: str) -> str:
    return f"ept/level{int(level)}.{part}.npy"


# -- writing ---------------------------------------------------------------------------------


def write_snapshot(state: VmState, out: IO[bytes], key: bytes | None = None) -> None:
    """Write ``state`` to ``out`` (an empty, seekable binary file)."""
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        text = json.dumps(state_document(state), separators=(",", ":")).encode()
        archive.writestr("state.json", text)
        sizes["state.json"] = len(text)
        for level in Level:
            for part, array in (
                ("bases", state.ept.bases[level]),
                ("entries", state.ept.entries[level]),
            ):
                name = _member(level, part)
                with archive.open(name, "w", force_zip64=True) as member:
                    np.lib.format.write_array(
                        member, np.ascontiguousarray(array), allow_pickle=False
                    )
                sizes[name] = archive.getinfo(name).file_size
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "written_by": f"mtrremu {own_version()}",
            "members": sizes,
        }
        archive.writestr("manifest.json", json.dumps(manifest, indent=1))
        archive.comment = b" " * _COMMENT_BYTES
    end = out.tell()
    out.seek(0)
    scheme, digest = _digest(_chunks(out, end - _COMMENT_BYTES), key)
    out.seek(end - _COMMENT_BYTES)
    out.write(scheme.ljust(_SCHEME_BYTES).encode() + digest.encode())
    out.seek(end)


def write_snapshot_file(path: Path, state: VmState, key: bytes | None = None) -> None:
    """Write ``state`` to ``path`` atomically: into a temporary file beside it, flushed to
    disk, then renamed over ``path`` (and the directory flushed), so a crash at any moment
    leaves either the previous file or the new one, whole."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as out:
            write_snapshot(state, out, key)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# -- reading ---------------------------------------------------------------------------------


def read_snapshot(
    source: IO[bytes],
    key: bytes | None = None,
    *,
    admit: Callable[[VmConfig], object] | None = None,
) -> VmState:
    """The state in a snapshot (``source``: a seekable binary file holding nothing else).
    Raises :class:`InvalidSnapshot` saying what is wrong. Reading allocates no more than the
    snapshot's VM configuration allows its EPT to hold; ``admit`` sees that configuration
    first and may refuse it (by raising)."""
    size = source.seek(0, io.SEEK_END)
    if size < _MIN_FILE_BYTES:
        raise InvalidSnapshot(f"not a snapshot: {size} bytes is too short (truncated?)")
    source.seek(size - _COMMENT_BYTES)
    comment = source.read(_COMMENT_BYTES)
    scheme = comment[:_SCHEME_BYTES].decode("ascii", "replace").strip()
    stored = comment[_SCHEME_BYTES:]
    if scheme not in ("sha256", "hmac-sha256"):
        raise InvalidSnapshot("not a snapshot, or truncated: it does not end with its checksum")
    if scheme == "hmac-sha256" and key is None:
        raise InvalidSnapshot("the snapshot is signed with a key, and no key was given")
    if scheme == "sha256" and key is not None:
        raise InvalidSnapshot("the snapshot is not signed, and this reader requires a signature")
    source.seek(0)
    _, digest = _digest(_chunks(source, size - _COMMENT_BYTES), key)
    if not hmac.compare_digest(digest.encode(), stored):
        raise InvalidSnapshot(
            f"checksum mismatch ({scheme}): the snapshot was corrupted, truncated or altered"
        )
    source.seek(0)
    try:
        with zipfile.ZipFile(source) as archive:
            return _read_archive(archive, admit)
    except InvalidSnapshot:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError) as error:
        raise InvalidSnapshot(f"the snapshot's archive cannot be read: {error}") from None


def read_snapshot_file(path: Path | str, key: bytes | None = None) -> VmState:
    with open(path, "rb") as source:
        return read_snapshot(source, key)


def _read_archive(archive: zipfile.ZipFile, admit: Callable[[VmConfig], object] | None) -> VmState:
    manifest = _json(archive, "manifest.json", _MANIFEST_MAX_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidSnapshot(f"not a snapshot: the manifest does not name the {FORMAT} format")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidSnapshot(f"the manifest's format version {version!r} is not valid")
    if version > VERSION:
        raise InvalidSnapshot(
            f"format version {version} is newer than this mtrremu reads ({VERSION}); "
            f"it was written by {manifest.get('written_by', 'an unknown writer')}"
        )
    expected = {"state.json", *(_member(level, p) for level in Level for p in ("bases", "entries"))}
    sizes = manifest.get("members")
    present = set(archive.namelist()) - {"manifest.json"}
    if not isinstance(sizes, dict) or set(sizes) != expected or present != expected:
        raise InvalidSnapshot("the snapshot's members are not the ones its format version has")
    for name in expected:
        if archive.getinfo(name).file_size != sizes[name]:
            raise InvalidSnapshot(f"member {name} has not the size its manifest gives")
    document = _json(archive, "state.json", _STATE_MAX_BYTES)
    if not isinstance(document, dict):
        raise InvalidSnapshot("state.json is not an object")
    # The configuration bounds the arrays: parse it (fully checked) before reading them.
    config = parse_config(document.get("config"))
    if admit is not None:
        admit(config)
    spans = [slot.gfns for slot in config.sorted_memslots()]
    bases: dict[Level, npt.NDArray[np.int64]] = {}
    entries: dict[Level, npt.NDArray[np.uint8]] = {}
    for level in Level:
        bound = table_bound(spans, level, mmio_table_budget(config))
        bases[level] = _array(
            archive,
            _member(level, "bases"),
            np.dtype("<i8"),
            rows=None,
            columns=None,
            max_rows=bound,
        )
        entries[level] = _array(
            archive,
            _member(level, "entries"),
            np.dtype("u1"),
            rows=len(bases[level]),
            columns=ENTRIES_PER_TABLE,
            max_rows=bound,
        )
    return parse_state_document(document, EptImage(bases, entries, 0))


def _json(archive: zipfile.ZipFile, name: str, limit: int) -> Any:
    if name not in archive.namelist():
        raise InvalidSnapshot(f"not a snapshot: it has no {name}")
    if archive.getinfo(name).file_size > limit:
        raise InvalidSnapshot(f"{name} is larger than the {limit} bytes it may hold")
    try:
        return json.loads(archive.read(name))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidSnapshot(f"{name} is not valid JSON: {error}") from None


def _array(
    archive: zipfile.ZipFile,
    name: str,
    dtype: np.dtype[Any],
    *,
    rows: int | None,
    columns: int | None,
    max_rows: int,
) -> Any:
    """The ``.npy`` member ``name``: ``rows`` (any number up to ``max_rows`` if ``None``) of
    ``columns`` (a flat array if ``None``) ``dtype`` values, checked before its data is read."""
    with archive.open(name) as member:
        try:
            major, _ = np.lib.format.read_magic(member)
            if major == 1:
                shape, fortran, got = np.lib.format.read_array_header_1_0(member)
            elif major == 2:
                shape, fortran, got = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unknown .npy version {major}")
        except ValueError as error:
            raise InvalidSnapshot(f"{name} is not a NumPy array: {error}") from None
        count = (shape[0] if shape else -1) if rows is None else rows
        wanted = (count,) if columns is None else (count, columns)
        if got != dtype or fortran or tuple(shape) != wanted or not 0 <= count <= max_rows:
            raise InvalidSnapshot(
                f"{name} holds a {got} array of shape {tuple(shape)}, not {dtype} values "
                f"shaped {wanted} with at most {max_rows} rows"
            )
        size = count * (columns or 1) * dtype.itemsize
        data = member.read(size)
        if len(data) != size or member.read(1):
            raise InvalidSnapshot(f"{name} does not hold exactly the data its header announces")
    return np.frombuffer(data, dtype=dtype).reshape(wanted)


# -- the checksum ----------------------------------------------------------------------------


def _digest(chunks: Iterator[bytes], key: bytes | None) -> tuple[str, str]:
    """(scheme, hex digest) of the bytes ``chunks`` yields."""
    hasher: Any = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return ("hmac-sha256" if key is not None else "sha256"), hasher.hexdigest()


def _chunks(source: IO[bytes], count: int) -> Iterator[bytes]:
    """The next ``count`` bytes of ``source``, in bounded chunks."""
    while count > 0:
        chunk = source.read(min(count, _CHUNK_BYTES))
        if not chunk:
            raise InvalidSnapshot("the snapshot ended early (truncated)")
        count -= len(chunk)
        yield chunk
