"""An opt-in token: with --token-file every call but health checks needs it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from mtrremu.client import Client
from mtrremu.core.errors import MtrremuError
from mtrremu.core.events import FaultRange
from tests.helpers import run_mtrremu, serving

TOKEN = "s3cret-token"


def test_calls_without_the_right_token_are_unauthenticated() -> None:
    with serving(token=TOKEN) as server:
        address = server.addresses[0]
        with Client(address) as anonymous:
            assert anonymous.health() == "SERVING"  # probes need no secret
            with pytest.raises((grpc.RpcError, MtrremuError)) as refused:
                anonymous.create_vm()
            assert "UNAUTHENTICATED" in str(refused.value)
        with Client(address, token="wrong") as wrong:
            with pytest.raises((grpc.RpcError, MtrremuError)) as refused:
                wrong.list_strategies()
            assert "UNAUTHENTICATED" in str(refused.value)
        with Client(address, token=TOKEN) as client:
            vm = client.create_vm()
            results = vm.execute([FaultRange(0, 0, 1 << 21)])  # the stream carries it too
            assert not results[0].HasField("error")
            assert vm.counters().faults >= 1
        assert len(list(server.table.created_after(0))) == 1  # only the authorised one


def test_serve_refuses_an_empty_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    done = run_mtrremu("serve", "--token-file", str(empty), timeout=60)
    assert done.returncode == 2
    assert "holds no token" in done.stderr
    assert "Traceback" not in done.stderr
