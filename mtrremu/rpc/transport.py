"""Transport settings the client and the server share."""

from __future__ import annotations

#: Largest message either end sends or accepts unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def message_size_options(size: int) -> list[tuple[str, int]]:
    """gRPC channel or server options capping messages at ``size`` bytes in both directions."""
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
