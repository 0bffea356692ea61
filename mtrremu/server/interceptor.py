"""A server interceptor logging each call (method, status code, duration), and the rate limit
on the server's log lines."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

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
    handler: grpc.RpcMethodHandler[Any, Any], unary: Wrap, streaming: Wrap
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour wrapped: ``unary`` for calls answered by one message,
    ``streaming`` for calls answered by a stream."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream),
        handler.request_deserializer,
        handler.response_serializer,
    )


#: Health checks answer without the token, so that probes need no secret.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenInterceptor(_Interceptor):
    """With ``--token-file``: every call but health checks must carry the metadata
    ``authorization: Bearer <token>``; others are refused with ``UNAUTHENTICATED``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
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
