"""OpenTelemetry traces, exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

Off (no endpoint), `enabled()` is False and every helper here returns at once without making a
span object, a context or a carrier: the untraced path costs a global read. On, spans go through
a `BatchSpanProcessor` (a bounded queue that its own thread exports): a request never waits on
the collector, and a span that cannot be queued or exported is counted in
`infermesh_otel_spans_dropped_total`. The standard `OTEL_*` variables configure the SDK
(endpoint, TLS, timeout, queue sizes, service name, resource); the sampler is parent-based with a
trace-id ratio (`OTEL_TRACES_SAMPLER_ARG`, 1.0 unless set) unless `OTEL_TRACES_SAMPLER` names
another. At a public front (the gateway) a client's `traceparent` gives the trace id, not the
decision: its spans are sampled at the same ratio, drawn at random (a client picks its trace id,
so a trace-id ratio would be its choice too), unless the operator sets
`INFERMESH_TRACES_HONOUR_CLIENT_SAMPLED=true`. Otherwise any API client could force every one
of its requests to be traced, and crowd the export queue so that others' spans drop.
The context travels as W3C `traceparent`: gRPC metadata, HTTP headers, and the scheduler's
`RouteRequest.traceparent` (one RouteStream carries many generations' routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

SPANS_DROPPED = Counter(
    "infermesh_otel_spans_dropped_total",
    "Spans never exported: the export queue was full (queue_full) or the collector refused or "
    "did not answer (export_failed). Requests never wait for the collector.", ["reason"])

# W3C allows a later version to append fields; this bounds what is read before parsing. A
# malformed or longer value is ignored (a new trace starts), as the W3C recommendation says.
MAX_TRACEPARENT_CHARS = 256
TRACE_HEADERS = ("traceparent", "tracestate")
SPAN_FLUSH_TIMEOUT_S = 3.0
# The operator's setting: a public front follows its clients' sampled flag (off unless "true").
HONOUR_CLIENT_SAMPLED = "INFERMESH_TRACES_HONOUR_CLIENT_SAMPLED"

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: trace.Tracer | None = None
_provider: Any = None  # the SDK's TracerProvider once configured


def enabled() -> bool:
    return _tracer is not None


def configure_tracing(service: str, public_front: bool = False) -> bool:
    """Exports this process's spans over OTLP gRPC when the environment names an endpoint;
    returns whether it does. The SDK is imported only then. `public_front`: the process's
    remote parents are API clients, not mesh peers (see the module's docstring)."""
    global _tracer, _provider
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if (not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
            or os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "none"):
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.namespace": "infermesh"}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service
    sampler = None  # the SDK reads OTEL_TRACES_SAMPLER
    if not os.environ.get("OTEL_TRACES_SAMPLER"):
        honour = os.environ.get(HONOUR_CLIENT_SAMPLED, "").lower() == "true"
        sampler = _sampler(_ratio(os.environ.get("OTEL_TRACES_SAMPLER_ARG")),
                           client_decides=honour or not public_front)
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(_CountingExporter(OTLPSpanExporter())))
    logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_count_queue_full)
    _provider = provider
    _tracer = provider.get_tracer("infermesh")
    return True


def _sampler(ratio: float, client_decides: bool) -> Any:
    """Parent-based on `ratio`; unless `client_decides`, a remote parent's flag is ignored and
    its spans are drawn at `ratio` (at random: the trace id is the client's) in its trace."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )

    by_trace_id = TraceIdRatioBased(ratio)
    if client_decides:
        return ParentBased(by_trace_id)

    class ClientBlindRatio(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                          links=None, trace_state=None) -> SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if random.random() < ratio:
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, parent.trace_state)
            return SamplingResult(Decision.DROP, None, parent.trace_state)

        def get_description(self) -> str:
            return f"ClientBlindRatio{{{ratio}}}"

    blind = ClientBlindRatio()
    return ParentBased(by_trace_id, remote_parent_sampled=blind, remote_parent_not_sampled=blind)


def _ratio(text: str | None) -> float:
    try:
        ratio = float(text) if text else 1.0
    except ValueError:
        return 1.0
    return min(max(ratio, 0.0), 1.0)


async def shutdown_tracing() -> None:
    """Exports what is queued, for at most SPAN_FLUSH_TIMEOUT_S (a dead collector cannot hold a
    stopping process)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is None:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SPAN_FLUSH_TIMEOUT_S):
            await asyncio.to_thread(provider.shutdown)


def _count_queue_full(record: logging.LogRecord) -> bool:
    """The SDK logs each span it drops from a full queue; counted instead of logged."""
    if record.getMessage().startswith("Queue full"):
        SPANS_DROPPED.labels("queue_full").inc()
        return False
    return True


class _CountingExporter:
    """The OTLP exporter, counting the spans of every batch it could not deliver."""

    def __init__(self, inner: Any):
        self._inner = inner

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        result = self._inner.export(spans)
        if result is not SpanExportResult.SUCCESS:
            SPANS_DROPPED.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


# -- spans -----------------------------------------------------------------------------------


def span(name: str, kind: SpanKind = SpanKind.INTERNAL,
         attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Span | None]:
    """A child of the current span for the `with` block (None, and nothing made, when off). An
    exception leaving the block sets the span's status to ERROR with its message."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes,
                                         record_exception=False)


def span_from(traceparent: str, name: str, kind: SpanKind = SpanKind.SERVER,
              attributes: Mapping[str, Any] | None = None
              ) -> AbstractContextManager[Span | None]:
    """A span whose parent is the W3C `traceparent` (a new trace when it is empty or malformed),
    current for the `with` block; nothing when off."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(
        name, context=parent_from(((TRACE_HEADERS[0], traceparent),)), kind=kind,
        attributes=attributes, record_exception=False)


def linked_span(name: str, origin: SpanContext | None,
                attributes: Mapping[str, Any] | None = None
                ) -> AbstractContextManager[Span | None]:
    """The root of a trace of its own, linked to `origin` (work that follows a generation
    without being part of it: a shadow copy), current for the block; nothing when off."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(
        name, context=Context(), attributes=attributes, record_exception=False,
        links=[Link(origin)] if origin is not None else None)


def current_context() -> SpanContext | None:
    """The current span's context, to link to (None when off or no span is current)."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def current() -> Span | None:
    """The current span when tracing is on and it records; None otherwise."""
    if _tracer is None:
        return None
    current_span = trace.get_current_span()
    return current_span if current_span.is_recording() else None


def add_event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    if _tracer is not None:
        trace.get_current_span().add_event(name, attributes)


def parent_from(carrier: Iterable[tuple[str, Any]]) -> Context | None:
    """The remote parent in gRPC metadata or HTTP headers (`traceparent`, `tracestate`); None
    when off. Values past MAX_TRACEPARENT_CHARS are ignored."""
    if _tracer is None:
        return None
    headers = {key: str(value) for key, value in carrier
               if key in TRACE_HEADERS and len(str(value)) <= MAX_TRACEPARENT_CHARS}
    return _PROPAGATOR.extract(headers)


def traceparent() -> str:
    """The current context as a W3C `traceparent` ("" when off or no span is current)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the current context to a peer; None when off or none is current."""
    value = traceparent()
    return ((TRACE_HEADERS[0], value),) if value else None


# -- one generation --------------------------------------------------------------------------


@dataclass
class FrontTrace:
    """What a front knows before the pipeline runs: the client's context and when the request
    arrived and was authenticated (the authentication span is recorded with those times)."""

    parent: Context | None
    started_ns: int = field(default_factory=time.time_ns)
    authenticated_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)

    def authenticated(self) -> None:
        self.authenticated_ns = time.time_ns()


def front_trace(carrier: Iterable[tuple[str, Any]], **attributes: Any) -> FrontTrace | None:
    """A FrontTrace started now, None when tracing is off."""
    if _tracer is None:
        return None
    return FrontTrace(parent_from(carrier), attributes=attributes)


@contextlib.contextmanager
def generation_span(front: FrontTrace, name: str, attributes: Mapping[str, Any]
                    ) -> Iterator[Span | None]:
    """The generation's root span (kind SERVER, a child of the client's span when it sent one),
    current for the block, starting when the request arrived; its first child is the
    authentication, as the front timed it."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(
            name, context=front.parent, kind=SpanKind.SERVER, start_time=front.started_ns,
            attributes={**front.attributes, **attributes}, record_exception=False) as root:
        if front.authenticated_ns:
            _tracer.start_span("authenticate", start_time=front.started_ns).end(
                end_time=front.authenticated_ns)
        yield root


def set_error(target: Span | None, code: str, message: str) -> None:
    if target is not None:
        target.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))


# -- logs ------------------------------------------------------------------------------------


def add_trace_ids(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: `trace_id` and `span_id` of the current span, when there is one."""
    if _tracer is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event["trace_id"] = format(context.trace_id, "032x")
            event["span_id"] = format(context.span_id, "016x")
    return event
