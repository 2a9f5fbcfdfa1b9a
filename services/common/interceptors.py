"""Server-side wrapping of every RPC handler: request ids in logs, RPC metrics, and a server
span for a call that carries a W3C `traceparent` while tracing is on.

The request id comes from the `x-request-id` metadata (generated when absent) and is bound to
structlog's contextvars inside the handler's own task, so every log line of the RPC carries it.
The public Inference service is left to its fronts, which make one trace per generation
(several may share one GenerateStream).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Histogram

from services.common import telemetry

REQUEST_ID_KEY = "x-request-id"
UNTRACED_SERVICES = frozenset({"infermesh.v1.Inference"})
_NO_SPAN = contextlib.nullcontext()

RPCS = Counter(
    "infermesh_grpc_server_handled_total", "RPCs completed, by method and status code.",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "infermesh_grpc_server_handling_seconds", "Wall time from RPC start to its end.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def request_id_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:128]
    return uuid.uuid4().hex


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Binds the request id for logs and counts every RPC by its final status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        return rewrap(handler, _wrap_unary(handler.unary_unary or handler.stream_unary,
                                           service, method),
                      _wrap_stream(handler.unary_stream or handler.stream_stream, service, method))


def rewrap(handler: grpc.RpcMethodHandler, unary: Callable[..., Any],
           stream: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced: `unary` for calls with one response (unary or
    client-streaming), `stream` for calls that stream responses; same shape, same codecs."""
    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **codecs)
    return grpc.stream_stream_rpc_method_handler(stream, **codecs)


def _observe(service: str, method: str, started: float, context: Any, failed: bool) -> None:
    code = context.code()
    if code is None:
        code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
    RPCS.labels(service, method, code.name).inc()
    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)


def _server_span(service: str, method: str, context: grpc.aio.ServicerContext) -> Any:
    """The RPC's span (rpc.* semantic conventions) when tracing is on and the caller sent a
    `traceparent`; a context manager that does nothing otherwise."""
    if not telemetry.enabled() or service in UNTRACED_SERVICES:
        return _NO_SPAN
    parent = next((str(value) for key, value in context.invocation_metadata() or ()
                   if key == "traceparent"), "")
    if not parent:
        return _NO_SPAN
    return telemetry.span_from(parent, f"{service}/{method}", SpanKind.SERVER,
                               {"rpc.system": "grpc", "rpc.service": service,
                                "rpc.method": method})


def _wrap_unary(behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        structlog.contextvars.bind_contextvars(request_id=request_id_from(context), rpc=method)
        started = time.perf_counter()
        failed = True
        try:
            with _server_span(service, method, context):
                result = await behavior(request_or_iterator, context)
            failed = False
            return result
        finally:
            _observe(service, method, started, context, failed)

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        structlog.contextvars.bind_contextvars(request_id=request_id_from(context), rpc=method)
        started = time.perf_counter()
        failed = True
        try:
            with _server_span(service, method, context):
                async for response in behavior(request_or_iterator, context):
                    yield response
            failed = False
        finally:
            _observe(service, method, started, context, failed)

    return wrapped
