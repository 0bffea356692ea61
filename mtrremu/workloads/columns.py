"""A trace's items held as columns, so a long trace costs little memory and is read once.

Each item is one row of :data:`ROW`: its operation kind (the index of its row in
:data:`mtrremu.core.operations.OPERATIONS`), the vCPU, up to two integer fields (``a``, ``b``)
and up to eight flags, in the order the operation table lists the kind's fields. That is 22
bytes, against about 200 for the item as an object. An item that does not fit a row (a burst,
a multi-MSR write) is kept as an object beside the rows and its row points at it.

Rows are kept in chunks of :data:`CHUNK_ROWS`. Past :data:`MEMORY_BYTES` of chunks in memory,
the rest go to a temporary spool file and are read back one chunk at a time, so memory stays
bounded however long the trace is (docs/traces.md#memory).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, overload

import numpy as np
import numpy.typing as npt

from mtrremu.core.events import Burst, Item, Op
from mtrremu.core.operations import OPERATIONS, OperationKind

#: One item: kind, flags, vCPU, and two integer fields.
ROW = np.dtype(
    [
        ("kind", np.uint8),
        ("flags", np.uint8),
        ("vcpu", np.uint32),
        ("a", np.uint64),
        ("b", np.uint64),
    ]
)
#: The ``kind`` of a row whose item is kept as an object (``a`` is its index in the chunk).
OBJECT = 255
CHUNK_ROWS = 1 << 16
#: Chunks held in memory before the rest are spooled to a temporary file.
MEMORY_BYTES = 64 << 20


@dataclass(frozen=True)
class Layout:
    """How one kind of operation sits in a row, compiled from its fields once."""

    kind: OperationKind
    index: int
    #: Integer fields other than ``vcpu``, in field order: they go to ``a`` then ``b``.
    ints: tuple[str, ...]
    #: Boolean fields, in field order: flag bit 0, 1, ...
    flags: tuple[str, ...]
    #: ``build(vcpu, a, b, flags)``: the operation.
    build: Callable[[int, int, int, int], Op]
    #: ``row(op)``: ``(vcpu, a, b, flags)``.
    row: Callable[[Any], tuple[int, int, int, int]]


def _layout(index: int, kind: OperationKind) -> Layout | None:
    """``kind``'s layout, or ``None`` if its items do not fit a row (they are kept whole).

    The two functions are generated as :mod:`dataclasses` generates ``__init__``: they run
    for every item of a trace, so they read each field directly."""
    ints = tuple(f.name for f in kind.fields if f.type in ("int", int) and f.name != "vcpu")
    flags = tuple(f.name for f in kind.fields if f.type in ("bool", bool))
    if len(ints) > 2 or len(flags) > 8 or len(ints) + len(flags) + 1 < len(kind.fields):
        return None
    has_vcpu = any(f.name == "vcpu" for f in kind.fields)
    arguments, row = [], ["o.vcpu" if has_vcpu else "0", "0", "0", "0"]
    for field in kind.fields:
        if field.name == "vcpu":
            arguments.append("v")
        elif field.name in ints:
            slot = ints.index(field.name)
            arguments.append("ab"[slot])
            row[1 + slot] = f"o.{field.name}"
        else:
            bit = flags.index(field.name)
            arguments.append(f"bool(f >> {bit} & 1)")
    if flags:
        row[3] = " | ".join(f"o.{name} << {bit}" for bit, name in enumerate(flags))
    namespace = {"build": kind.type}
    return Layout(
        kind,
        index,
        ints,
        flags,
        eval(f"lambda v, a, b, f: build({', '.join(arguments)})", namespace),
        eval(f"lambda o: ({', '.join(row)})", {}),
    )


#: Per operation table row: its layout, or ``None`` (kept whole).
LAYOUTS: tuple[Layout | None, ...] = tuple(_layout(i, k) for i, k in enumerate(OPERATIONS))
_BY_TYPE = {layout.kind.type: layout for layout in LAYOUTS if layout is not None}


class _Chunk:
    """Up to CHUNK_ROWS rows, in memory or at ``offset`` in the spool, and their objects."""

    def __init__(self, rows: npt.NDArray[Any], objects: list[Item]) -> None:
        self.rows: npt.NDArray[Any] | None = rows
        self.objects: list[Item] | None = objects
        self.offset = -1
        self.sizes = (0, 0)


class TraceItems(Sequence[Item]):
    """A trace's items in columns (built with :meth:`append` / :meth:`extend`, then read with
    iteration or indexing). Iteration builds each item as it goes: nothing but the rows and the
    current chunk's items is held."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        """``memory_bytes``: chunks held in memory before spooling (:data:`MEMORY_BYTES`)."""
        self._chunks: list[_Chunk] = []
        self._memory_bytes = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._in_memory = 0
        self._spool: IO[bytes] | None = None
        # The open chunk, a list per column (appending to lists is the cheap part).
        self._columns: tuple[list[int], ...] = ([], [], [], [], [])
        self._objects: list[Item] = []
        self._length = 0
        #: Operations in all, bursts counted by their lane operations.
        self.operations = 0

    # -- building -------------------------------------------------------------------------

    def append_row(self, index: int, vcpu: int, a: int, b: int, flags: int) -> None:
        """Add an item given as a row (``index``: its kind's row in the operation table);
        the values must fit the columns."""
        kinds, all_flags, vcpus, first, second = self._columns
        kinds.append(index)
        all_flags.append(flags)
        vcpus.append(vcpu)
        first.append(a)
        second.append(b)
        self._length += 1
        self.operations += 1
        if len(kinds) == CHUNK_ROWS:
            self._close_chunk()

    def append(self, item: Item) -> None:
        layout = _BY_TYPE.get(type(item))
        if layout is not None:
            vcpu, a, b, flags = layout.row(item)
            self.append_row(layout.index, vcpu, a, b, flags)
            return
        # The object first: the row may close the chunk, which takes the chunk's objects along.
        self._objects.append(item)
        self.append_row(OBJECT, 0, len(self._objects) - 1, 0, 0)
        if isinstance(item, Burst):
            self.operations += sum(len(ops) for _, ops in item.lanes) - 1

    def extend(self, items: Iterable[Item]) -> None:
        for item in items:
            self.append(item)

    def _close_chunk(self) -> None:
        rows = np.empty(len(self._columns[0]), dtype=ROW)
        for name, values in zip(ROW.names or (), self._columns, strict=True):
            rows[name] = values
            values.clear()
        chunk = _Chunk(rows, self._objects)
        self._objects = []
        if self._in_memory + rows.nbytes > self._memory_bytes:
            self._spill(chunk)
        else:
            self._in_memory += rows.nbytes
        self._chunks.append(chunk)

    def _spill(self, chunk: _Chunk) -> None:
        if self._spool is None:
            # Open for the columns' lifetime (closed by close() or with them): no `with`.
            self._spool = tempfile.TemporaryFile(prefix="mtrremu-trace-")  # noqa: SIM115
        assert chunk.rows is not None
        objects = pickle.dumps(chunk.objects, protocol=pickle.HIGHEST_PROTOCOL)
        self._spool.seek(0, 2)
        chunk.offset = self._spool.tell()
        self._spool.write(chunk.rows.tobytes())
        self._spool.write(objects)
        chunk.sizes = (chunk.rows.nbytes, len(objects))
        chunk.rows = chunk.objects = None

    def seal(self) -> None:
        """No more items: close the last chunk."""
        if self._columns[0]:
            self._close_chunk()

    # -- reading --------------------------------------------------------------------------

    def _load(self, chunk: _Chunk) -> tuple[npt.NDArray[Any], list[Item]]:
        if chunk.rows is not None and chunk.objects is not None:
            return chunk.rows, chunk.objects
        assert self._spool is not None
        self._spool.seek(chunk.offset)
        rows = np.frombuffer(self._spool.read(chunk.sizes[0]), dtype=ROW)
        objects: list[Item] = pickle.loads(self._spool.read(chunk.sizes[1]))
        return rows, objects

    def chunks(self) -> Iterator[tuple[npt.NDArray[Any], list[Item]]]:
        """Each chunk's rows and kept objects, in order (:meth:`seal` first)."""
        for chunk in self._chunks:
            yield self._load(chunk)

    def __iter__(self) -> Iterator[Item]:
        for rows, objects in self.chunks():
            yield from items_of(rows, objects)

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Item]: ...

    def __getitem__(self, index: int | slice) -> Item | Sequence[Item]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        rows, objects = self._load(self._chunks[index // CHUNK_ROWS])
        return next(items_of(rows[index % CHUNK_ROWS : index % CHUNK_ROWS + 1], objects))

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @property
    def spooled(self) -> bool:
        return self._spool is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


def items_of(rows: npt.NDArray[Any], objects: Sequence[Item]) -> Iterator[Item]:
    """The items of ``rows`` (and the objects rows of kind :data:`OBJECT` point at)."""
    columns = zip(
        rows["kind"].tolist(),
        rows["vcpu"].tolist(),
        rows["a"].tolist(),
        rows["b"].tolist(),
        rows["flags"].tolist(),
        strict=True,
    )
    for kind, vcpu, a, b, flags in columns:
        if kind == OBJECT:
            yield objects[a]
        else:
            layout = LAYOUTS[kind]
            assert layout is not None
            yield layout.build(vcpu, a, b, flags)
