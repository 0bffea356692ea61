"""The server's interceptors: one logging each call (method, status code, duration), one
refusing requests that are not protobuf, one checking the token; and the rate limit on the
server's log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool

from mtrremu.core.errors import InvalidArgument
from mtrremu.rpc.status import abort
from mtrremu.server.clients import Clients

log = logging.getLogger("mtrremu.server")


class RateLimit(logging.Filter):
    """Lets at most ``per_second`` records through per second; the first record let through
    after some were dropped says how many. One client flooding the server with bad calls
    cannot flood its log."""

    def __init__(self, per_second: int = 50, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.per_second = per_second
        self._clock = clock
        self._second = -1
        self._passed = 0
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        second = int(self._clock())
        if second != self._second:
            self._second, self._passed = second, 0
        if self._passed >= self.per_second:
            self.dropped += 1
            return False
        self._passed += 1
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} log lines suppressed before this one)"
            self.dropped = 0
        return True


def limit_logging(per_second: int = 50) -> None:
    """Put one :class:`RateLimit` on the server's logger and gRPC's own (once per process)."""
    for name in ("mtrremu.server", "grpc._server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(per_second))


def _code(context: grpc.ServicerContext) -> str:
    code = context.code()  # type: ignore[attr-defined]
    return "OK" if code is None else str(code.name)


if TYPE_CHECKING:  # the stubs make it generic; the runtime class is not subscriptable
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


class LoggingInterceptor(_Interceptor):
    """Logs one line per call at INFO (DEBUG for the high-rate stream's batches)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    return behaviour(request, context)
                finally:
                    log.info("%s %s %.3f ms", method, _code(context), _ms(started))

            return call

        def streaming(behaviour: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.perf_counter()
                messages = 0
                try:
                    for response in behaviour(request, context):
                        messages += 1
                        yield response
                finally:
                    log.info(
                        "%s %s %d messages %.3f ms", method, _code(context), messages, _ms(started)
                    )

            return call

        return rewrapped(handler, unary, streaming)


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrapped(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Wrap,
    streaming: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour wrapped: ``unary`` for calls answered by one message,
    ``streaming`` for calls answered by a stream; and its request deserializer replaced if one
    is given."""
    decode = request_deserializer or handler.request_deserializer
    encode = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), decode, encode)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), decode, encode)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), decode, encode)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), decode, encode)


#: Why a JSON request is refused. gRPC's core never shows a request's content-type to Python
#: (it keeps only whether it starts with ``application/grpc``, and serves any), so JSON sent as
#: ``application/grpc+json`` is recognised by its bytes.
JSON_REFUSAL = (
    "it looks like JSON, but this server speaks protobuf only "
    "(content-type application/grpc+json is not supported)"
)


class NotARequest:
    """What bytes that are not the method's request message decode to: the call is refused with
    INVALID_ARGUMENT before its handler runs."""

    def __init__(self, message: str, why: object) -> None:
        self.error = InvalidArgument(f"the request is not a valid {message}: {why}")


def request_name(method: str) -> str:
    """The full name of the request message of ``/package.Service/Method``."""
    service, _, name = method.strip("/").rpartition("/")
    try:
        return str(
            descriptor_pool.Default().FindMethodByName(f"{service}.{name}").input_type.full_name
        )
    except KeyError:
        return "request"


def looks_like_json(data: bytes) -> bool:
    """Whether ``data`` starts like a JSON object (what gRPC's JSON encoding sends)."""
    return data.lstrip()[:1] == b"{"


class ProtobufOnly(_Interceptor):
    """Refuses a request whose bytes are not the method's protobuf message, with
    INVALID_ARGUMENT and before the handler runs, for every service (gRPC itself would answer
    INTERNAL and log a traceback for each); a JSON request (``application/grpc+json``) is told
    so. The servicer's handlers therefore only ever see decoded messages."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        name = request_name(handler_call_details.method)
        streamed = handler.request_streaming

        def decode(data: bytes) -> Any:
            try:
                request = deserialize(data)
            except Exception as error:  # gRPC's own services' deserializers raise DecodeError
                return NotARequest(name, JSON_REFUSAL if looks_like_json(data) else error)
            return request

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if streamed:
                return _refusing(request, context)
            if isinstance(request, NotARequest):
                abort(context, request.error)
            return request

        def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                return behaviour(checked(request, context), context)

            return call

        def streaming(behaviour: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                yield from behaviour(checked(request, context), context)

            return call

        return rewrapped(handler, unary, streaming, decode)


def _refusing(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    """A request stream that ends the call at its first message that is not a request."""
    for request in requests:
        if isinstance(request, NotARequest):
            abort(context, request.error)
        yield request


#: Health checks answer without the token, so that probes need no secret.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenInterceptor(_Interceptor):
    """With ``--token-file``: every call but health checks must carry the metadata
    ``authorization: Bearer <token>`` of a known client; others are refused with
    ``UNAUTHENTICATED``."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS):
            return handler
        if self._clients.client_of(handler_call_details.invocation_metadata or ()) is not None:
            return handler

        def refuse(context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")

        def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                refuse(context)

            return call

        def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                refuse(context)
                yield from ()

            return call

        return rewrapped(handler, unary, streaming)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1e3
