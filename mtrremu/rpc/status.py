"""Domain errors ↔ gRPC statuses with a ``google.rpc.ErrorInfo`` detail.

The server turns an :class:`MtrremuError` into a status whose code comes from the error class
and whose ErrorInfo carries the class's stable reason and its metadata (for a refused host write:
the register, value and cause). The client turns such a status back into the same error class,
looked up by reason in the registry the error classes fill themselves.
"""

from __future__ import annotations

from typing import NamedTuple, NoReturn, cast
from urllib.parse import quote

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mtrremu.core.errors import (
    BY_REASON,
    FailedPrecondition,
    InvalidArgument,
    MtrremuError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from mtrremu.rpc.convert import trimmed

DOMAIN = "mtrremu.v1"
#: One error class per status code; subclasses share their base's code.
_STATUS_CLASSES: tuple[type[MtrremuError], ...] = (
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    ResourceExhausted,
    PermissionDenied,
)
_CODES = {cls.status: code_pb2.Code.Value(cls.status) for cls in _STATUS_CLASSES}
_BY_CODE = {grpc.StatusCode[cls.status]: cls for cls in _STATUS_CLASSES}


def error_info(error: MtrremuError) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)
    for key, value in error.metadata().items():
        info.metadata[key] = trimmed(value)
    return info


#: Plain trailing-metadata keys that repeat the ErrorInfo, for clients that cannot decode
#: ``grpc-status-details-bin`` (it needs google/rpc/status.proto): ``mtrremu-reason`` and one
#: ``mtrremu-<key>`` per metadata entry, values percent-encoded UTF-8.
TRAILER_PREFIX = "mtrremu-"


class _Status(NamedTuple):
    """What grpc.ServicerContext.abort_with_status reads of a grpc.Status."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def to_status(error: MtrremuError) -> grpc.Status:
    """The status a server aborts with for ``error``: its code, its message, a
    ``google.rpc.ErrorInfo`` detail, and the same information as plain trailers."""
    code = _CODES.get(error.status, code_pb2.INVALID_ARGUMENT)
    detail = any_pb2.Any()
    info = error_info(error)
    detail.Pack(info)
    message = status_pb2.Status(code=code, message=trimmed(str(error)), details=[detail])
    plain = [(f"{TRAILER_PREFIX}reason", info.reason)]
    plain += [(TRAILER_PREFIX + key, quote(value)) for key, value in sorted(info.metadata.items())]
    packed: grpc.Status = rpc_status.to_status(message)
    # abort_with_status only reads the three attributes: a plain tuple of them will do.
    return cast(
        grpc.Status, _Status(packed.code, packed.details, (*packed.trailing_metadata, *plain))
    )


def abort(context: grpc.ServicerContext, error: MtrremuError) -> NoReturn:
    context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def from_rpc_error(error: grpc.RpcError) -> MtrremuError | None:
    """The domain error a failed call stands for, or ``None`` for a non-domain failure."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    info = None
    if status is not None:
        for detail in status.details:
            candidate = error_details_pb2.ErrorInfo()
            if detail.Unpack(candidate) and candidate.domain == DOMAIN:
                info = candidate
    message = error.details() or ""
    if info is not None:
        cls = BY_REASON.get(info.reason)
        rebuilt = None if cls is None else cls.from_metadata(message, dict(info.metadata))
        if rebuilt is not None:
            return rebuilt
    by_code = _BY_CODE.get(error.code())
    return None if by_code is None else by_code(message)


def raise_domain(error: grpc.RpcError) -> NoReturn:
    """Re-raise a failed call as its domain error (or as it was)."""
    domain = from_rpc_error(error)
    if domain is None:
        raise error
    raise domain from error
