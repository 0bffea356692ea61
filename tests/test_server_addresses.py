"""Addresses are exclusive and unix sockets private: a second server never silently shares a
port or takes over a path, a stale socket is replaced, a file in the way is a clear error."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from mtrremu.client import Client
from mtrremu.core.errors import InvalidArgument
from mtrremu.server.app import EmulatorServer, ServerSettings
from tests.helpers import run_mtrremu, serving


def test_a_second_server_on_a_used_tcp_port_fails_to_start() -> None:
    with serving("127.0.0.1:0") as first:
        address = first.addresses[0]
        second = EmulatorServer(ServerSettings(listen=(address,)))
        with pytest.raises(InvalidArgument, match="in use"):
            second.start()
        with Client(address) as client:  # the first one still answers every connection
            for _ in range(5):
                assert client.health() == "SERVING"


def test_a_unix_path_another_server_listens_on_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with serving(f"unix:{path}") as first:
        second = EmulatorServer(ServerSettings(listen=(f"unix:{path}",)))
        with pytest.raises(InvalidArgument, match="another server is listening"):
            second.start()
        with Client(first.addresses[0]) as client:
            assert client.health() == "SERVING"


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # bound, never listening: what a killed server leaves behind
    left.close()
    assert stat.S_ISSOCK(path.stat().st_mode)
    with serving(f"unix:{path}") as server, Client(server.addresses[0]) as client:
        assert client.health() == "SERVING"


def test_a_unix_socket_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "private.sock"
    previous = os.umask(0)
    try:
        with serving(f"unix:{path}"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_a_file_in_the_way_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    done = run_mtrremu("serve", "--listen", f"unix:{path}", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "exists and is not a socket" in done.stderr
    assert "Traceback" not in done.stderr
    assert path.read_text() == "mine\n"


def test_a_non_loopback_address_without_tls_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with serving("127.0.0.1:0"):
        assert "without TLS" not in caplog.text
    with serving("0.0.0.0:0"):
        assert "listening on 0.0.0.0:0 without TLS or authentication" in caplog.text


def test_reflection_can_be_turned_off() -> None:
    with serving() as on, grpc.insecure_channel(on.addresses[0]) as channel:
        assert (
            "mtrremu.v1.EmulatorService"
            in ProtoReflectionDescriptorDatabase(channel).get_services()
        )
    with serving(reflection=False) as off, grpc.insecure_channel(off.addresses[0]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
