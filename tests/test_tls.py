"""TLS over loopback with generated CAs: the right CA connects, a wrong one is refused, a plain
client is refused, and with client verification a client without a certificate is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from mtrremu.client import Client
from mtrremu.rpc.transport import Tls
from tests.helpers import run_mtrremu, serving


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> Tls:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return Tls(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes())


@pytest.fixture
def tls_address(server_tls: Tls) -> Iterator[str]:
    with serving("127.0.0.1:0", tls=server_tls) as server:
        yield server.addresses[0]


def health(address: str, tls: Tls | None) -> str:
    with Client(address, tls=tls, timeout=5) as client:
        return client.health()


def test_the_right_ca_connects(ca: trustme.CA, tls_address: str) -> None:
    assert health(tls_address, Tls(peer_ca=ca.cert_pem.bytes())) == "SERVING"


def test_a_wrong_ca_or_a_plain_client_is_refused(tls_address: str) -> None:
    stranger = trustme.CA()
    for tls in (Tls(peer_ca=stranger.cert_pem.bytes()), None):
        with pytest.raises(grpc.RpcError) as refused:
            health(tls_address, tls)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_client_verification_refuses_a_client_without_a_certificate(
    ca: trustme.CA, server_tls: Tls
) -> None:
    clients = trustme.CA()
    verifying = Tls(server_tls.cert_chain, server_tls.private_key, clients.cert_pem.bytes())
    with serving("127.0.0.1:0", tls=verifying) as server:
        address = server.addresses[0]
        with pytest.raises(grpc.RpcError):
            health(address, Tls(peer_ca=ca.cert_pem.bytes()))
        mine = clients.issue_cert("vmm.example")
        signed = Tls(
            mine.cert_chain_pems[0].bytes(), mine.private_key_pem.bytes(), ca.cert_pem.bytes()
        )
        assert health(address, signed) == "SERVING"
        other = trustme.CA().issue_cert("vmm.example")
        forged = Tls(
            other.cert_chain_pems[0].bytes(), other.private_key_pem.bytes(), ca.cert_pem.bytes()
        )
        with pytest.raises(grpc.RpcError):
            health(address, forged)


def test_serve_refuses_half_a_tls_setting(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not used\n")
    done = run_mtrremu("serve", "--tls-cert", str(cert), timeout=60)
    assert done.returncode == 2
    assert "--tls-cert and --tls-key go together" in done.stderr
    assert "Traceback" not in done.stderr
