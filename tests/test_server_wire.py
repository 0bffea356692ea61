"""Bytes that are not a request: every method answers INVALID_ARGUMENT, the server logs one
bounded line per call and no traceback, and its log is rate-limited."""

from __future__ import annotations

import logging

import grpc
import pytest

from mtrremu.server.interceptor import RateLimit
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import serving

SERVICE = pb.DESCRIPTOR.services_by_name["EmulatorService"]
#: A truncated varint, a field whose length runs past the end, an invalid wire type.
GARBAGE = (b"\x08", b"\x0a\x05ab", b"\x0f\x00", b"\xff" * 11)


def identity(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize("garbage", GARBAGE)
def test_every_method_refuses_undecodable_bytes(
    garbage: bytes, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    with serving() as server, grpc.insecure_channel(server.addresses[0]) as channel:
        # Count every line here: the rate limit (tested below) would drop some.
        for limit in logging.getLogger("mtrremu.server").filters:
            if isinstance(limit, RateLimit):
                monkeypatch.setattr(limit, "per_second", 1_000_000)
        for method in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{method.name}"
            kind = (method.client_streaming, method.server_streaming)
            with pytest.raises(grpc.RpcError) as refused:
                if kind == (False, False):
                    channel.unary_unary(path, identity, identity)(garbage, timeout=10)
                elif kind == (False, True):
                    list(channel.unary_stream(path, identity, identity)(garbage, timeout=10))
                else:
                    list(
                        channel.stream_stream(path, identity, identity)(iter([garbage]), timeout=10)
                    )
            error = refused.value
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (method.name, error)
            name = f"mtrremu.v1.{method.input_type.name}"
            assert f"the request is not a valid {name}" in (error.details() or "")
            trailers: dict[str, object] = dict(error.trailing_metadata() or ())  # type: ignore[arg-type]
            assert trailers["mtrremu-reason"] == "INVALID_ARGUMENT"
    records = [r for r in caplog.records if r.name.startswith(("mtrremu", "grpc"))]
    assert not [r for r in records if r.exc_info or "Traceback" in r.getMessage()]
    assert all(len(r.getMessage()) < 300 for r in records)
    calls = [r for r in records if "INVALID_ARGUMENT" in r.getMessage()]
    assert len(calls) == len(SERVICE.methods)  # one line per call


def test_the_log_is_rate_limited_and_says_what_it_dropped() -> None:
    now = [100.0]
    limit = RateLimit(per_second=3, clock=lambda: now[0])

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("mtrremu.server", logging.INFO, __file__, 1, text, None, None)

    passed = [limit.filter(record(f"call {i}")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    now[0] += 1
    first = record("next second")
    assert limit.filter(first)
    assert first.getMessage() == "next second (7 log lines suppressed before this one)"
    assert limit.filter(record("again")) and limit.dropped == 0
