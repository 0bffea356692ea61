"""Transport settings the client and the server share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tls:
    """PEM material for one end of a TLS connection.

    A server needs ``cert_chain`` and ``private_key``; with ``peer_ca`` it also requires every
    client to present a certificate that CA signed. A client needs ``peer_ca`` (the CA that
    signed the server's certificate) and, for a server that verifies clients, its own
    ``cert_chain`` and ``private_key``.
    """

    cert_chain: bytes | None = None
    private_key: bytes | None = None
    peer_ca: bytes | None = None


#: Largest request message a server accepts (and a client sends) unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
#: No reply message is ever larger than this: a gRPC client's default receive limit, so a
#: client needs no setting to receive any answer.
REPLY_LIMIT_BYTES = 4 << 20
#: Execute answers a batch in response messages of at most this many bytes of results.
REPLY_CHUNK_BYTES = 1 << 20


def server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    """gRPC server options: requests up to ``max_request_bytes``, replies up to the limit, an
    exclusive port."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_send_message_length", REPLY_LIMIT_BYTES),
        # A second server on the same port must fail to start, not share the port's traffic.
        ("grpc.so_reuseport", 0),
    ]


def client_options(max_request_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options: requests up to ``max_request_bytes``; replies at gRPC's default
    limit, which every reply of the server fits."""
    return [
        ("grpc.max_send_message_length", max_request_bytes),
        ("grpc.max_receive_message_length", REPLY_LIMIT_BYTES),
    ]
