"""Bytes that are not a request: every method of every service the server serves answers
INVALID_ARGUMENT, the server logs one bounded line per call and no traceback, and its log is
rate-limited.

JSON (``content-type: application/grpc+json``) included. gRPC's core does not let the server see
a request's content-type: it keeps only whether the value starts with ``application/grpc``,
serves every value (even ``text/plain``) and leaves it out of the metadata a server or an
interceptor sees. So a JSON request is recognised by its bytes, which never decode as protobuf,
and the answer says the server speaks protobuf only. These calls go over a plain HTTP/2
connection (``h2``), since a gRPC client cannot send another content-type.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mtrremu.server.interceptor import JSON_REFUSAL, RateLimit
from mtrremu.v1 import emulator_pb2 as pb
from tests.helpers import call_raw, server_log, serving

SERVICES = (
    pb.DESCRIPTOR.services_by_name["EmulatorService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
#: Every method the server serves (reflection on, the default).
METHODS = [method for service in SERVICES for method in service.methods]
#: A truncated varint, a field whose length runs past the end, an invalid wire type.
GARBAGE = (b"\x08", b"\x0a\x05ab", b"\x0f\x00", b"\xff" * 11)
#: A line of the server's log stays under this many characters.
LINE_BOUND = 300


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def check_log(records: list[logging.LogRecord], calls: list[str]) -> None:
    """One bounded line per call, naming the call and its status, and nothing else."""
    assert not [r for r in records if r.exc_info or "Traceback" in r.getMessage()]
    assert all(len(r.getMessage()) < LINE_BOUND for r in records), records
    assert sorted(r.getMessage().split()[0] for r in records) == sorted(calls)
    assert all(r.getMessage().split()[1] == "INVALID_ARGUMENT" for r in records)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_every_method_refuses_undecodable_bytes(garbage: bytes) -> None:
    with (
        serving() as server,
        grpc.insecure_channel(server.addresses[0]) as channel,
        server_log() as records,
    ):
        for method in METHODS:
            answer = call_raw(channel, method, [garbage])
            assert answer.code is grpc.StatusCode.INVALID_ARGUMENT, (method.name, answer)
            name = method.input_type.full_name
            assert answer.details.startswith(f"the request is not a valid {name}: "), answer
            assert answer.trailers["mtrremu-reason"] == "INVALID_ARGUMENT"
    check_log([r for r in records if "serving" not in r.getMessage()], [path(m) for m in METHODS])


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


# -- JSON over plain HTTP/2 ------------------------------------------------------------------


@dataclass(frozen=True)
class Http2Answer:
    status: str
    #: The response's headers and trailers (a trailers-only answer has them all in its headers).
    fields: dict[str, str]
    body: bytes

    @property
    def grpc_status(self) -> int:
        return int(self.fields["grpc-status"])

    @property
    def message(self) -> str:
        return unquote(self.fields.get("grpc-message", ""))


def post_grpc(address: str, rpc: str, body: bytes, content_type: str) -> Http2Answer:
    """One call over a new plain HTTP/2 connection with the headers a gRPC client sends, but
    ``content_type``, and ``body`` as its one length-prefixed message."""
    host, port = address.rsplit(":", 1)
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    fields: dict[str, str] = {}
    data = bytearray()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        headers = {":method": "POST", ":scheme": "http", ":path": rpc, ":authority": address}
        headers |= {"content-type": content_type, "te": "trailers", "user-agent": "h2-test"}
        connection.send_headers(stream, list(headers.items()))
        connection.send_data(stream, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        sock.sendall(connection.data_to_send())
        ended = False
        while not ended:
            received = sock.recv(65536)
            assert received, "the server closed the connection before the call ended"
            for event in connection.receive_data(received):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    fields |= {str(k): str(v) for k, v in event.headers or ()}
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data or b""
                    connection.acknowledge_received_data(event.flow_controlled_length or 0, stream)
                elif isinstance(event, h2.events.StreamReset):
                    pytest.fail(f"{rpc}: stream reset ({event.error_code!r})")
                ended |= isinstance(event, h2.events.StreamEnded)
            sock.sendall(connection.data_to_send())
    return Http2Answer(fields.pop(":status"), fields, bytes(data))


def json_request(message: Descriptor) -> bytes:
    """A request in gRPC's JSON encoding (proto3 JSON) with a value in every field (the first
    of a oneof): what an ``application/grpc+json`` client sends."""
    request = GetMessageClass(message)()
    for field in message.fields:
        oneof = field.containing_oneof
        if oneof is not None and request.WhichOneof(oneof.name) is not None:
            continue
        held = getattr(request, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:
                held["key"] = "value"
        elif field.message_type is not None and field.is_repeated:
            held.add()
        elif field.message_type is not None:
            held.SetInParent()
        elif field.is_repeated:
            held.append(scalar(field))
        else:
            setattr(request, field.name, scalar(field))
    return json_format.MessageToJson(request, indent=2).encode()


def scalar(field: FieldDescriptor) -> object:
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    return {
        FieldDescriptor.TYPE_STRING: "vm-1",
        FieldDescriptor.TYPE_BYTES: b"\0\1\2",
        FieldDescriptor.TYPE_BOOL: True,
        FieldDescriptor.TYPE_DOUBLE: 0.5,
        FieldDescriptor.TYPE_FLOAT: 0.5,
    }.get(field.type, 1)


@pytest.mark.parametrize("pretty", [True, False], ids=["indented", "compact"])
def test_every_method_refuses_json_saying_it_speaks_protobuf_only(pretty: bool) -> None:
    with serving() as server, server_log() as records:
        calls = []
        for method in METHODS:
            body = json_request(method.input_type)
            if not pretty:
                body = json.dumps(json.loads(body), separators=(",", ":")).encode()
            answer = post_grpc(server.addresses[0], path(method), body, "application/grpc+json")
            calls.append(path(method))
            assert answer.status == "200" and answer.body == b"", (method.name, answer)
            assert answer.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
            name = method.input_type.full_name
            assert answer.message == f"the request is not a valid {name}: {JSON_REFUSAL}"
            assert "speaks protobuf only" in answer.message
            assert answer.fields["mtrremu-reason"] == "INVALID_ARGUMENT"
    check_log([r for r in records if "serving" not in r.getMessage()], calls)


@pytest.mark.parametrize(
    "content_type",
    ["application/grpc", "application/grpc+proto", "application/grpc+json", "text/plain"],
)
def test_the_content_type_is_not_seen_a_protobuf_request_is_served_whatever_it_says(
    content_type: str,
) -> None:
    """What docs/api.md#errors says: the bytes are judged, not the content-type."""
    with serving() as server:
        rpc = f"/{SERVICES[0].full_name}/ListStrategies"
        answer = post_grpc(server.addresses[0], rpc, b"", content_type)
    assert (answer.status, answer.grpc_status) == ("200", 0), answer
    listed = pb.ListStrategiesResponse.FromString(answer.body[5:])
    assert int.from_bytes(answer.body[1:5], "big") == len(answer.body) - 5
    assert "fine-grained" in [strategy.name for strategy in listed.strategies]
