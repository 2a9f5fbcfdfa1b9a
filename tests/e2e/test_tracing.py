"""One generation, one trace, across the real stack (issue 20): the shared stack runs its trace
receiver and samples only generations whose client sent a sampled `traceparent` (ratio 0), so
the rest of the suite pays nothing. A generation over gRPC and one over HTTP, each with a client
`traceparent`, produce one trace each, parented to the client's span, with the scheduler's span
a child of the gateway's route span; `meshctl trace` prints it in every format; the logs hold
no key or prompt text; the gateway's and the scheduler's lines for a traced generation carry
its trace id; a collector that hangs does not slow a generation."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import secrets
import signal
import time
import uuid

import openai
import pytest
import yaml
from typer.testing import CliRunner

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import StackInfo
from deploy.local.traces import GenerationTrace, SpanNode, generation_trace, read_spans, walk
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from meshctl.__main__ import app

pytestmark = pytest.mark.integration

PIPELINE_SPANS = {"authenticate", "validate", "quota", "admission queue", "route",
                  "scheduler route", "engine", "audit"}
PROMPT_MARK = "zebra-quartz-"  # a prompt no log line may ever hold


def client_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def wait_trace(stack: StackInfo, request_id: str, within_s: float = 15.0
                     ) -> GenerationTrace:
    """The generation's trace once every pipeline span has been received."""
    deadline = time.monotonic() + within_s
    while True:
        found = generation_trace(pathlib.Path(stack.traces_dir), request_id)
        names = {span.name for _, span in walk(found)} if found else set()
        if names >= PIPELINE_SPANS:
            assert found is not None
            return found
        assert time.monotonic() < deadline, f"spans received: {sorted(names)}"
        await asyncio.sleep(0.2)


def check_trace(found: GenerationTrace, trace_id: str, parent_span_id: str) -> dict[str, SpanNode]:
    assert found.trace_id == trace_id
    assert len(found.roots) == 1, [root.name for root in found.roots]
    root = found.roots[0]
    assert root.parent_span_id == parent_span_id and root.service == "gateway"
    spans = {span.name: span for _, span in walk(found)}
    for name in PIPELINE_SPANS - {"scheduler route"}:
        assert spans[name].parent_span_id == root.span_id, name
        assert spans[name].service == "gateway", name
    scheduler = spans["scheduler route"]
    assert scheduler.service == "scheduler"
    assert scheduler.parent_span_id == spans["route"].span_id
    assert scheduler.attributes["infermesh.replica_id"] == spans["route"].attributes[
        "infermesh.replica_id"]
    engine = spans["engine"]
    assert [event["name"] for event in engine.events] == ["first_token"]
    assert engine.attributes["gen_ai.usage.output_tokens"] >= 1
    assert root.attributes["gen_ai.response.finish_reasons"] in (["length"], ["stop"])
    assert root.attributes["infermesh.status_code"] == "OK"
    assert root.start_ns <= spans["authenticate"].start_ns <= spans["validate"].start_ns
    return spans


def log_lines(stack_dir: pathlib.Path, process: str, trace_id: str) -> list[dict]:
    path = stack_dir / "logs" / f"{process}.log"
    return [record for record in map(json.loads, path.read_text().splitlines())
            if record.get("trace_id") == trace_id]


async def test_a_grpc_generation_is_one_trace_under_the_clients_span(
        stack: StackInfo, stack_dir: pathlib.Path) -> None:
    trace_id, span_id, traceparent = client_traceparent()
    request_id = f"trace-grpc-{uuid.uuid4().hex[:8]}"
    async with stack.channel() as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                request_id=request_id, model=stack.reference_model, prompt=PROMPT_MARK + "1",
                params=inference_pb2.SamplingParams(max_tokens=4)),
            metadata=(("authorization", f"Bearer {stack.api_key}"),
                      ("traceparent", traceparent)), timeout=60)
    assert reply.usage.completion_tokens >= 1
    found = await wait_trace(stack, request_id)
    spans = check_trace(found, trace_id, span_id)
    assert spans["authenticate"].end_ns <= spans["validate"].start_ns
    root = next(span for span in spans.values() if span.name.startswith("text_completion "))
    assert root.attributes["rpc.method"] == "Generate"
    assert root.attributes["gen_ai.request.model"] == stack.reference_model

    # A sampled generation's log lines join its trace, in the gateway and in the scheduler.
    gateway = log_lines(stack_dir, "gateway", trace_id)
    assert [line["event"] for line in gateway] == ["generation_finished"]
    assert gateway[0]["span_id"] == root.span_id
    assert (gateway[0]["request_id"], gateway[0]["tenant"]) == (request_id, "demo")
    scheduler = [*log_lines(stack_dir, "scheduler", trace_id),
                 *log_lines(stack_dir, "scheduler-2", trace_id)]
    assert [line["event"] for line in scheduler] == ["route_decided"]
    assert scheduler[0]["span_id"] == spans["scheduler route"].span_id
    assert scheduler[0]["request_id"] == request_id

    runner = CliRunner()
    base = ["trace", request_id, "--traces-dir", stack.traces_dir]
    as_json = json.loads(runner.invoke(app, [*base, "-o", "json"]).stdout)
    assert as_json["trace_id"] == trace_id and as_json["spans"] == found.spans
    assert yaml.safe_load(runner.invoke(app, [*base, "-o", "yaml"]).stdout) == as_json
    table = runner.invoke(app, base).stdout.splitlines()
    assert table[0].split()[:4] == ["SPAN", "SERVICE", "START", "MS"]
    assert any(line.split()[:2] == ["scheduler", "route"] for line in table)
    missing = runner.invoke(app, ["trace", "no-such-request", "--traces-dir", stack.traces_dir])
    assert missing.exit_code == 5


async def test_an_http_generation_is_one_trace_under_the_clients_span(stack: StackInfo) -> None:
    trace_id, span_id, traceparent = client_traceparent()
    request_id = f"trace-http-{uuid.uuid4().hex[:8]}"
    client = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key=stack.api_key,
                                max_retries=0, timeout=60)
    async with client:
        reply = await client.chat.completions.create(
            model=stack.reference_model, max_tokens=4,
            messages=[{"role": "user", "content": PROMPT_MARK + "2"}],
            extra_headers={"traceparent": traceparent, "x-request-id": request_id})
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    spans = check_trace(await wait_trace(stack, request_id), trace_id, span_id)
    root = next(span for span in spans.values() if span.name.startswith("chat "))
    assert root.attributes["http.route"] == "/v1/chat/completions"


async def test_no_key_or_prompt_text_in_any_log_and_every_service_line_is_json(
        stack: StackInfo, stack_dir: pathlib.Path) -> None:
    _, _, traceparent = client_traceparent()
    async with stack.channel() as channel:  # a prompt of its own, traced or not
        await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(model=stack.reference_model, prompt=PROMPT_MARK + "3",
                                          params=inference_pb2.SamplingParams(max_tokens=2)),
            metadata=(("authorization", f"Bearer {stack.api_key}"),
                      ("traceparent", traceparent)), timeout=60)
    await asyncio.sleep(0.5)
    logs = sorted((stack_dir / "logs").glob("*.log"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        assert stack.api_key not in text, path.name
        assert PROMPT_MARK not in text, path.name
    for name in ("gateway", "scheduler", "scheduler-2", "ratelimit", "registry", "auditor",
                 "sidecar"):
        lines = (stack_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        assert lines, name
        for line in lines:
            record = json.loads(line)
            assert {"service", "level", "timestamp", "event"} <= set(record), (name, line)


async def test_a_hung_collector_leaves_generations_unaffected(stack: StackInfo) -> None:
    receiver = stack.pids["traces"]
    os.kill(receiver, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        _, _, traceparent = client_traceparent()
        started = time.monotonic()
        async with stack.channel() as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for index in range(3):
                reply = await stub.Generate(
                    inference_pb2.GenerateRequest(
                        model=stack.reference_model, prompt=f"collector down {index}",
                        params=inference_pb2.SamplingParams(max_tokens=2)),
                    metadata=(("authorization", f"Bearer {stack.api_key}"),
                              ("traceparent", traceparent)), timeout=10)
                assert reply.usage.completion_tokens >= 1
        assert time.monotonic() - started < 5.0
    finally:
        os.kill(receiver, signal.SIGCONT)


async def test_an_untraced_gateway_serves_a_real_generation_and_makes_no_span(
        stack: StackInfo, stack_dir: pathlib.Path) -> None:
    """The default path, tracing off (no interceptors, no traced relay), through a gateway of
    its own beside the traced stack: a real generation, and no span of it anywhere (the
    scheduler's neither: no context reached it), though its client sent a sampled parent."""
    trace_id, _, traceparent = client_traceparent()
    request_id = f"untraced-{uuid.uuid4().hex[:8]}"
    untraced = ExtraGateway(stack, stack_dir, name="gateway-untraced")
    await asyncio.to_thread(untraced.start)
    try:
        async with stack.channel("gateway", untraced.endpoint) as channel:
            reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
                inference_pb2.GenerateRequest(
                    request_id=request_id, model=stack.reference_model, prompt="rivers",
                    params=inference_pb2.SamplingParams(max_tokens=4, seed=1)),
                metadata=(("authorization", f"Bearer {stack.api_key}"),
                          ("traceparent", traceparent)), timeout=60)
    finally:
        await asyncio.to_thread(untraced.stop)
    assert reply.usage.completion_tokens == 4 and reply.text.strip()
    await asyncio.sleep(1.0)  # the traced processes export every 200 ms
    assert generation_trace(pathlib.Path(stack.traces_dir), request_id) is None
    assert not [span for span in read_spans(pathlib.Path(stack.traces_dir))
                if span.trace_id == trace_id]
    assert not log_lines(stack_dir, "gateway-untraced", trace_id)

