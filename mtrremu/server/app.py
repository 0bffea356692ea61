"""The gRPC server: the emulator service plus health checking, reflection and call logging.

Listens on ``127.0.0.1:50051`` unless told otherwise (never on all interfaces unless asked),
also on ``unix:`` paths. SIGINT/SIGTERM start a graceful shutdown: health turns NOT_SERVING,
new calls are refused, in-flight calls get ``grace`` seconds to finish.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mtrremu.core.errors import InvalidArgument
from mtrremu.plugin.manager import PluginManager, manager_for
from mtrremu.rpc.transport import Tls, server_options
from mtrremu.server.clients import Clients
from mtrremu.server.fairness import StreamGuard, StreamLimits
from mtrremu.server.interceptor import (
    LoggingInterceptor,
    ProtobufOnly,
    TokenInterceptor,
    limit_logging,
)
from mtrremu.server.limits import Limits, VmTable
from mtrremu.server.servicer import Servicer, service
from mtrremu.server.state_dir import StateDir, StateDirSettings
from mtrremu.v1 import emulator_pb2 as pb

DEFAULT_LISTEN = "127.0.0.1:50051"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmulatorService"].full_name
log = logging.getLogger("mtrremu.server")


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    limits: Limits = field(default_factory=Limits)
    #: Worker threads: enough for one client thread per vCPU of the VMs driven at once.
    max_workers: int = 256
    grace_seconds: float = 5.0
    #: Plugin modules to load besides the installed plugins (``--plugin``).
    plugins: tuple[str, ...] = ()
    #: Serve gRPC server reflection (``--no-reflection`` turns it off).
    reflection: bool = True
    #: TLS for every TCP address (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``); unix
    #: sockets stay plain (owner-only).
    tls: Tls | None = None
    #: Bounds on streaming calls (``--max-streams``, ``--max-streams-per-client``,
    #: ``--stream-idle-timeout``); the worker threads beyond ``max_streams`` stay free for
    #: unary calls and health checks.
    streams: StreamLimits = field(default_factory=StreamLimits)
    #: If set, every call but health checks must carry ``authorization: Bearer <token>`` of
    #: one of these clients, and each client sees only its own VMs (``--token-file``).
    clients: Clients | None = None
    #: Keep every VM in a state directory (``--state-dir``, ``--snapshot-interval``).
    state_dir: StateDirSettings | None = None
    #: Sign exported snapshots and require the signature on imports (``--snapshot-key-file``).
    snapshot_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.streams.max_streams >= self.max_workers:
            raise InvalidArgument(
                f"max_streams ({self.streams.max_streams}) must be below max_workers "
                f"({self.max_workers}): the rest serve unary calls and health checks"
            )


class EmulatorServer:
    """One running server. ``start`` binds every address and returns what was bound."""

    def __init__(self, settings: ServerSettings, manager: PluginManager | None = None) -> None:
        self.settings = settings
        limit_logging()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.max_workers, thread_name_prefix="mtrremu"
            ),
            interceptors=[
                LoggingInterceptor(),
                *([TokenInterceptor(settings.clients)] if settings.clients else []),
                ProtobufOnly(),
            ],
            options=server_options(settings.limits.max_message_bytes),
        )
        self.table = VmTable(settings.limits, manager or manager_for(settings.plugins))
        self.guard = StreamGuard(settings.streams)
        servicer = Servicer(self.table, settings.snapshot_key, settings.clients)
        self._server.add_generic_rpc_handlers((service(servicer, self.guard),))
        self.state_dir = (
            None if settings.state_dir is None else StateDir(settings.state_dir, self.table)
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                self._server,
            )
        self.addresses: list[str] = []
        self._stopped = threading.Event()

    def start(self) -> list[str]:
        """Bind and start; returns the bound addresses (a ``:0`` port replaced by the real one).

        Addresses are exclusive: a port or a unix path another server holds is refused
        (:class:`InvalidArgument`), a stale unix socket is replaced, and a unix socket is
        created readable and writable by its owner only, whatever the umask.
        """
        try:
            if self.state_dir is not None:
                self.state_dir.restore()
            sockets = self._bind_all()
        except BaseException:
            if self.state_dir is not None:
                self.state_dir.release()
            raise
        self._server.start()
        if self.state_dir is not None:
            self.state_dir.start()
        for path in sockets:
            os.chmod(path, 0o600)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving mtrremu.v1 on %s", ", ".join(self.addresses))
        return self.addresses

    def _bind_all(self) -> list[str]:
        """Bind every address; returns the unix socket paths."""
        sockets = []
        for address in self.settings.listen:
            if not (address.startswith("unix:") or is_loopback(address) or self.settings.tls):
                # A token sent in clear text protects nothing on a network.
                log.warning(
                    "listening on %s without TLS or authentication: any host that reaches it "
                    "can create, drive and delete VMs",
                    address,
                )
            if address.startswith("unix:"):
                path = unix_path(address)
                claim_unix_path(path)
                sockets.append(path)
            try:
                with _owner_only_umask(address.startswith("unix:")):
                    port = self._bind(address)
            except RuntimeError:
                port = 0
            if not port:
                raise InvalidArgument(
                    f"cannot listen on {address!r}: the address is in use or not valid"
                )
            if address.startswith("unix:"):
                self.addresses.append(address)
            else:
                host = address.rsplit(":", 1)[0]
                self.addresses.append(f"{host}:{port}")
        return sockets

    def _bind(self, address: str) -> int:
        tls = self.settings.tls
        if tls is None or address.startswith("unix:"):
            return self._server.add_insecure_port(address)
        assert tls.cert_chain is not None and tls.private_key is not None
        credentials = grpc.ssl_server_credentials(
            [(tls.private_key, tls.cert_chain)],
            root_certificates=tls.peer_ca,
            require_client_auth=tls.peer_ca is not None,
        )
        return self._server.add_secure_port(address, credentials)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let in-flight ones finish."""
        self.health.enter_graceful_shutdown()
        done: threading.Event = self._server.stop(
            self.settings.grace_seconds if grace is None else grace
        )
        done.wait()
        self.guard.close()
        if self.state_dir is not None:
            self.state_dir.close()
        self._stopped.set()
        return done

    def wait(self) -> None:
        self._stopped.wait()


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` address is on a loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unix_path(address: str) -> str:
    """The filesystem path of a ``unix:PATH`` or ``unix://PATH`` address."""
    path = address.removeprefix("unix:")
    return path.removeprefix("//") if path.startswith("///") else path


def claim_unix_path(path: str) -> None:
    """Make ``path`` free for a new socket: refuse one a live server answers on, or a file
    that is not a socket; remove a stale socket (nothing listens on it any more)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left by a server that is gone
        return
    except OSError as error:
        raise InvalidArgument(f"cannot listen on unix:{path}: {error}") from None
    finally:
        probe.close()
    raise InvalidArgument(f"cannot listen on unix:{path}: another server is listening on it")


@contextmanager
def _owner_only_umask(active: bool) -> Iterator[None]:
    """Create files owner-only while binding a unix socket (the mode is set again after)."""
    if not active:
        yield
        return
    previous = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(previous)


def serve(settings: ServerSettings, *, announce: Sequence[str] = ()) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = EmulatorServer(settings)
    addresses = server.start()
    for line in announce:
        print(line.format(addresses=", ".join(addresses)), flush=True)

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down (grace %.1f s)", signum, settings.grace_seconds)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.wait()
