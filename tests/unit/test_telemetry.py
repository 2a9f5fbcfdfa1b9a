"""Tracing in one process, against a real OTLP gRPC endpoint on loopback (the stack's receiver,
in-test): spans are parented to the client's `traceparent`, log lines (structlog's and a
library's through stdlib logging) carry the current trace and span ids, a dead collector costs
the caller nothing but dropped spans (counted), and with no endpoint nothing is made at all."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from backends.triton.adapter import EngineChunk, EngineRequest
from deploy.local.traces import TRACES_FILE, TraceFileWriter, generation_trace, read_spans
from services.common import telemetry
from services.common.discovery import trace_interceptors
from services.common.interceptors import ObservabilityInterceptor
from services.common.logs import configure_logging, get_logger
from services.common.net import LOOPBACK, free_port
from services.gateway.peers import Route
from services.gateway.shadow import ShadowTraffic
from services.registry.manifest import ModelVersion

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture
async def receiver(tmp_path) -> AsyncIterator[str]:
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        TraceFileWriter(tmp_path / TRACES_FILE), server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    yield f"http://{LOOPBACK}:{port}"
    await server.stop(0)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_off_makes_nothing(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert not telemetry.configure_tracing("gateway")
    assert not telemetry.enabled()
    assert telemetry.span("a") is telemetry.span("b")  # one shared no-op context manager
    with telemetry.span("a") as made:
        assert made is None
    assert telemetry.front_trace([("traceparent", CLIENT_TRACEPARENT)]) is None
    assert telemetry.traceparent() == "" and telemetry.outgoing_metadata() is None
    assert telemetry.current() is None


async def test_spans_parented_to_the_client_and_logs_joined(
        receiver: str, tmp_path, monkeypatch, capsys, restore_logging) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")  # only a sampled parent is traced
    configure_logging("gateway")
    assert telemetry.configure_tracing("gateway")
    try:
        front = telemetry.front_trace([("traceparent", CLIENT_TRACEPARENT)],
                                      **{"rpc.system": "grpc"})
        assert front is not None
        front.authenticated()
        with telemetry.generation_span(front, "chat demo", {"infermesh.request_id": "r-1"}):
            with telemetry.span("route") as route:
                assert route is not None
                forwarded = telemetry.traceparent()
                get_logger("services.gateway.test").info("routing", replica="r0")
                logging.getLogger("aetcd").warning("a library's line")
            with telemetry.span_from(forwarded, "scheduler route"):
                pass
        with telemetry.span("unparented"):  # ratio 0, no parent: not sampled, not exported
            pass
    finally:
        await telemetry.shutdown_tracing()
    spans = {span.name: span for span in read_spans(tmp_path)}
    assert set(spans) == {"chat demo", "authenticate", "route", "scheduler route"}
    root = spans["chat demo"]
    assert (root.trace_id, root.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert root.attributes["rpc.system"] == "grpc"
    assert spans["authenticate"].parent_span_id == root.span_id
    assert spans["route"].parent_span_id == root.span_id
    assert spans["scheduler route"].parent_span_id == spans["route"].span_id
    assert forwarded == f"00-{CLIENT_TRACE}-{spans['route'].span_id}-01"
    found = generation_trace(tmp_path, "r-1")
    assert found is not None and [r.name for r in found.roots] == ["chat demo"]
    assert found.spans == 4

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()
             if line.startswith("{")]
    joined = [line for line in lines if line.get("trace_id") == CLIENT_TRACE]
    assert {line["logger"] for line in joined} == {"services.gateway.test", "aetcd"}
    for line in joined:
        assert line["span_id"] == spans["route"].span_id
        assert line["service"] == "gateway"


async def test_a_peer_call_carries_the_context_and_the_peer_makes_a_child(
        receiver: str, tmp_path, monkeypatch) -> None:
    """The client interceptors send `traceparent`; the server's (every mesh server's) starts
    its RPC span from it."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    assert telemetry.configure_tracing("gateway")
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
                f"{LOOPBACK}:{port}", interceptors=trace_interceptors()) as channel:
            with telemetry.span("quota"):
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
            await health_pb2_grpc.HealthStub(channel).Check(  # no span current: no child
                health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(0)
        await telemetry.shutdown_tracing()
    spans = list(read_spans(tmp_path))
    assert sorted(span.name for span in spans) == ["grpc.health.v1.Health/Check", "quota"]
    child = next(span for span in spans if span.name != "quota")
    parent = next(span for span in spans if span.name == "quota")
    assert (child.trace_id, child.parent_span_id) == (parent.trace_id, parent.span_id)
    assert child.attributes["rpc.method"] == "Check" and child.kind == 2  # SERVER


class _Routing:
    async def route(self, *args, **kwargs):
        return Route("replica-0", "replica-0", "reservation-0")

    async def release_route(self, *args, **kwargs):
        return None


class _Engine:
    async def generate(self, endpoint, request):
        yield EngineChunk("text", 3, 1, True)


async def test_a_shadow_copy_is_a_trace_of_its_own_linked_to_its_origin(
        receiver: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    assert telemetry.configure_tracing("gateway")
    shadow = ShadowTraffic(_Routing(), _Engine(), max_in_flight=1, timeout_s=5.0)
    version = ModelVersion("sha256:" + "0" * 64, {"name": "demo"})
    try:
        front = telemetry.front_trace([("traceparent", CLIENT_TRACEPARENT)])
        assert front is not None
        with telemetry.generation_span(front, "chat demo", {}):
            assert shadow.submit(version, EngineRequest(
                request_id="r-2", triton_model_name="demo", prompt="hello", max_tokens=2))
        async with asyncio.timeout(5):
            while shadow._running:  # the copy runs to its end (close would cancel it)
                await asyncio.sleep(0.01)
    finally:
        await telemetry.shutdown_tracing()
    lines = [json.loads(line) for line in (tmp_path / TRACES_FILE).read_text().splitlines()]
    spans = [span for line in lines for resource in line["resourceSpans"]
             for scope in resource["scopeSpans"] for span in scope["spans"]]
    by_name = {span["name"]: span for span in spans}
    copy, origin = by_name["shadow demo"], by_name["chat demo"]
    assert copy["traceId"] != CLIENT_TRACE and "parentSpanId" not in copy
    assert copy["links"] == [{"traceId": CLIENT_TRACE, "spanId": origin["spanId"],
                              "flags": copy["links"][0]["flags"]}]


async def test_a_dead_collector_costs_only_dropped_spans(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{LOOPBACK}:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    dropped = telemetry.SPANS_DROPPED.labels("export_failed")
    before = dropped._value.get()
    assert telemetry.configure_tracing("gateway")
    try:
        started = time.perf_counter()
        for index in range(20):
            with telemetry.span(f"span {index}"):
                pass
        assert time.perf_counter() - started < 0.5  # queued, never exported on the caller
    finally:
        stopping = time.perf_counter()
        await telemetry.shutdown_tracing()
        assert time.perf_counter() - stopping <= telemetry.SPAN_FLUSH_TIMEOUT_S + 0.5
    assert dropped._value.get() - before == 20


def _span_under(sampler, traceparent: str):
    """A span the SDK makes under `sampler` with the client's `traceparent` as its parent."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    tracer = TracerProvider(sampler=sampler).get_tracer("test")
    return tracer.start_span("chat demo", context=parent)


UNSAMPLED_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"


def test_a_public_fronts_clients_neither_force_nor_refuse_sampling_but_keep_their_trace_id():
    """At ratio 0 a client's sampled flag traces nothing; at ratio 1 an unsampled one is
    traced anyway, in the client's trace. A trace id picked under the ratio's bound (the
    client's to pick) forces nothing either: the draw is random."""
    blind = telemetry._sampler(0.0, client_decides=False)
    assert not _span_under(blind, CLIENT_TRACEPARENT).is_recording()
    traced = _span_under(telemetry._sampler(1.0, client_decides=False), UNSAMPLED_TRACEPARENT)
    assert traced.is_recording()
    assert format(traced.get_span_context().trace_id, "032x") == CLIENT_TRACE
    lowest = f"00-{'0' * 31}1-{CLIENT_SPAN}-01"  # under any trace-id ratio's bound
    half = telemetry._sampler(0.5, client_decides=False)
    recorded = sum(_span_under(half, lowest).is_recording() for _ in range(400))
    assert 120 < recorded < 280  # one trace id, drawn each time


def test_inside_the_mesh_a_peers_sampled_flag_decides():
    trusting = telemetry._sampler(0.0, client_decides=True)
    assert _span_under(trusting, CLIENT_TRACEPARENT).is_recording()
    assert not _span_under(telemetry._sampler(1.0, client_decides=True),
                           UNSAMPLED_TRACEPARENT).is_recording()


@pytest.mark.parametrize(("public_front", "honour", "description"), [
    (True, "", "ClientBlindRatio"), (True, "true", "ParentBased"),
    (False, "", "ParentBased")])
async def test_the_operator_setting_makes_a_public_front_honour_its_clients_flag(
        monkeypatch, public_front, honour, description) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{LOOPBACK}:9")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv(telemetry.HONOUR_CLIENT_SAMPLED, honour)
    assert telemetry.configure_tracing("gateway", public_front)
    try:
        blind = "ClientBlindRatio" in telemetry._provider.sampler.get_description()
        assert blind is (description == "ClientBlindRatio")
    finally:
        await telemetry.shutdown_tracing()
