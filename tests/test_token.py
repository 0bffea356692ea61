"""Clients: with --token-file every call but health checks needs a known client's token, and
a VM belongs to the client that made it (docs/api.md#clients)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from mtrremu.client import Client
from mtrremu.core.errors import InvalidArgument, MtrremuError, NotOwned, UnknownVm
from mtrremu.core.events import FaultRange, ReadCounters
from mtrremu.server.clients import Clients
from tests.helpers import run_mtrremu, serving

TOKEN = "s3cret-token"


def test_calls_without_the_right_token_are_unauthenticated() -> None:
    with serving(clients=Clients.single(TOKEN)) as server:
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
        assert len(server.table.entries()) == 1  # only the authorised one


def test_serve_refuses_an_empty_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    done = run_mtrremu("serve", "--token-file", str(empty), timeout=60)
    assert done.returncode == 2
    assert "holds no token" in done.stderr
    assert "Traceback" not in done.stderr


TOKENS = """
# two teams sharing one server
alice a-token
bob b-token
"""


def test_a_vm_belongs_to_the_client_that_made_it() -> None:
    with serving(clients=Clients.parse(TOKENS, "tokens")) as server:
        address = server.addresses[0]
        with Client(address, token="a-token") as alice, Client(address, token="b-token") as bob:
            mine = alice.create_vm()
            mine.fault_range(0, 0, 1 << 21)
            before = mine.counters()
            theirs = bob.vm(mine.vm_id)
            for attempt in (
                theirs.delete,
                theirs.describe,
                lambda: theirs.fault_range(0, 0, 1 << 30),
                lambda: list(theirs.dump_leaves()),
                theirs.export,
                lambda: theirs.execute([FaultRange(0, 0, 1 << 30), ReadCounters()]),
            ):
                with pytest.raises(NotOwned) as refused:
                    attempt()
                assert refused.value.vm_id == mine.vm_id
            assert [v.vm_id for v in bob.list_vms()] == []
            assert [v.vm_id for v in alice.list_vms()] == [mine.vm_id]
            assert mine.counters() == before  # nothing bob tried touched it
            copy = bob.import_vm(mine.export())  # an import belongs to the importer
            assert [v.vm_id for v in bob.list_vms()] == [copy.vm_id]
            mine.delete()
            with pytest.raises(UnknownVm):
                alice.vm(mine.vm_id).describe()


def test_a_token_file_is_checked_line_by_line() -> None:
    assert Clients.parse("solo\n", "f").client_of([("authorization", "Bearer solo")]) == "default"
    for text, why in (
        ("a x\nb x\n", "repeats"),
        ("a x\na y\n", "repeats"),
        ("a b c\n", "NAME TOKEN"),
        ("# nothing\n", "holds no token"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            Clients.parse(text, "f")
