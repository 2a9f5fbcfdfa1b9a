"""End to end over real etcd and real Triton: every request gets a correct answer or a clear
error, cancellation reaches the engine, and the audit chain holds."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from typer.testing import CliRunner

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from meshctl.__main__ import app
from services.auditor.store import list_segments
from services.auditor.verify import verify
from services.common import etcd, tls
from services.common.tenancy import Tenant, TenantPlan, TenantStore

pytestmark = pytest.mark.integration


def auth(key: str):
    return (("authorization", f"Bearer {key}"),)


def start(request_id: str, model: str, prompt: str, **params) -> inference_pb2.ClientFrame:
    return inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id=request_id, model=model, prompt=prompt,
        params=inference_pb2.SamplingParams(**params)))


class Conversation:
    """One GenerateStream: send frames whenever, collect frames per request id."""

    def __init__(self, stack: StackInfo, key: str | None = None):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._channel = stack.channel()
        stub = inference_pb2_grpc.InferenceStub(self._channel)
        self.call = stub.GenerateStream(self._frames(), metadata=auth(key or stack.api_key))
        self.frames: dict[str, list] = {}

    async def _frames(self):
        while (frame := await self._outbox.get()) is not None:
            yield frame

    async def send(self, frame) -> None:
        await self._outbox.put(frame)

    async def read_until_final(self, request_ids: set[str], on_frame=None) -> dict[str, object]:
        finals = {}
        async for frame in self.call:
            kind = frame.WhichOneof("frame")
            if kind == "heartbeat":
                continue
            body = getattr(frame, kind)
            self.frames.setdefault(body.request_id, []).append(frame)
            if on_frame is not None:
                await on_frame(frame)
            if kind == "final":
                finals[body.request_id] = body
                if request_ids <= finals.keys():
                    return finals
        raise AssertionError(f"stream ended before every Final: have {sorted(finals)}")

    def text(self, request_id: str) -> str:
        return "".join(f.tokens.text for f in self.frames[request_id]
                       if f.WhichOneof("frame") == "tokens")

    async def close(self) -> None:
        await self._outbox.put(None)
        await self._channel.close()


async def test_streamed_generation(stack: StackInfo):
    conv = Conversation(stack)
    await conv.send(start("s1", stack.reference_model, "Tell me about streams",
                          max_tokens=12, seed=3))
    finals = await conv.read_until_final({"s1"})
    await conv.close()
    final = finals["s1"]
    kinds = [f.WhichOneof("frame") for f in conv.frames["s1"]]
    assert kinds[0] == "accepted" and kinds[-1] == "final" and kinds.count("tokens") >= 2
    assert conv.frames["s1"][0].accepted.model_version == final.model_version
    assert final.model_version.startswith("sha256:")
    assert final.finish_reason == inference_pb2.LENGTH
    assert final.usage.completion_tokens == 12
    assert final.usage.prompt_tokens == 4
    assert final.timings.time_to_first_token.ToNanoseconds() > 0
    assert len(conv.text("s1").split()) == 12


async def test_unary_generation_matches_stream_for_same_seed(stack: StackInfo):
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = await stub.Generate(inference_pb2.GenerateRequest(
            model=stack.reference_model, prompt="Tell me about streams",
            params=inference_pb2.SamplingParams(max_tokens=12, seed=3)),
        metadata=auth(stack.api_key))
    conv = Conversation(stack)
    await conv.send(start("u1", stack.reference_model, "Tell me about streams",
                          max_tokens=12, seed=3))
    await conv.read_until_final({"u1"})
    await conv.close()
    assert reply.text == conv.text("u1") and reply.text.strip()
    assert reply.finish_reason == inference_pb2.LENGTH
    assert reply.usage.completion_tokens == 12
    assert reply.model_version.startswith("sha256:")


async def test_two_generations_multiplexed_on_one_stream(stack: StackInfo):
    conv = Conversation(stack)
    await conv.send(start("a", stack.reference_model, "first prompt", max_tokens=20, seed=1))
    await conv.send(start("b", stack.reference_model, "second prompt", max_tokens=8, seed=2))
    finals = await conv.read_until_final({"a", "b"})
    await conv.close()
    assert finals["a"].usage.completion_tokens == 20
    assert finals["b"].usage.completion_tokens == 8
    assert len(conv.text("a").split()) == 20 and len(conv.text("b").split()) == 8


def engine_metrics(stack: StackInfo) -> str:
    url = f"http://{stack.metrics['triton']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# The engine's metrics are per Triton model; the torch engine shares the server.
def reference(stack: StackInfo) -> dict[str, str]:
    """The labels of the reference engine's version in Triton's metrics."""
    return {"model": stack.triton_models[stack.reference_model]}


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_cancel_mid_stream_stops_the_engine(stack: StackInfo):
    before = engine_metrics(stack)
    cancelled_before = metric(before, "infermesh_engine_requests_total", outcome="cancelled",
                              **reference(stack))
    conv = Conversation(stack)
    seen = 0

    async def cancel_after_three(frame):
        nonlocal seen
        if frame.WhichOneof("frame") == "tokens":
            seen += 1
            if seen == 3:
                await conv.send(inference_pb2.ClientFrame(
                    cancel=inference_pb2.Cancel(request_id="c1")))

    await conv.send(start("c1", stack.reference_model, "a long story please",
                          max_tokens=1000, seed=5))
    finals = await conv.read_until_final({"c1"}, on_frame=cancel_after_three)
    await conv.close()
    final = finals["c1"]
    assert final.finish_reason == inference_pb2.CANCELLED
    assert 3 <= final.usage.completion_tokens < 1000 or final.usage.completion_tokens == 0
    # The engine itself recorded the cancellation and stopped generating.
    deadline = time.monotonic() + 10
    while True:
        text = engine_metrics(stack)
        cancelled = metric(text, "infermesh_engine_requests_total", outcome="cancelled",
                           **reference(stack))
        if cancelled == cancelled_before + 1:
            break
        assert time.monotonic() < deadline, "the engine never recorded the cancellation"
        await asyncio.sleep(0.1)
    assert metric(text, "nv_trt_llm_request_metrics", request_type="active",
                  **reference(stack)) == 0
    generated = metric(text, "infermesh_engine_generated_tokens_total", **reference(stack))
    await asyncio.sleep(0.5)
    assert metric(engine_metrics(stack), "infermesh_engine_generated_tokens_total",
                  **reference(stack)) == generated


@pytest.mark.parametrize("key", [None, "imk_not-a-real-key", ""])
async def test_missing_or_wrong_key_is_unauthenticated(stack: StackInfo, key):
    metadata = () if key is None else auth(key)
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(
                inference_pb2.GenerateRequest(model=stack.reference_model, prompt="hi"),
                metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.GenerateStream(iter([start("x", stack.reference_model, "hi")]),
                                   metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "params,field",
    [
        ({"max_tokens": 0}, "params.max_tokens"),
        ({"max_tokens": 100000}, "params.max_tokens"),
        ({"temperature": 9.0}, "params.temperature"),
        ({"top_p": 1.5}, "params.top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "params.stop"),
    ],
)
async def test_bad_parameters_name_the_field(stack: StackInfo, params, field):
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(inference_pb2.GenerateRequest(
                model=stack.reference_model, prompt="hi",
                params=inference_pb2.SamplingParams(**params)),
                metadata=auth(stack.api_key))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(field + ":")
    conv = Conversation(stack)
    await conv.send(start("bad", stack.reference_model, "hi", **params))
    finals = await conv.read_until_final({"bad"})
    await conv.close()
    assert finals["bad"].finish_reason == inference_pb2.ERROR
    assert finals["bad"].error.code == "INVALID_ARGUMENT"
    assert finals["bad"].error.field == field


async def test_unknown_model_is_not_found(stack: StackInfo):
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for model in ("no-such-model", f"{stack.reference_model}@canary",
                      f"{stack.reference_model}@sha256:{'f' * 64}"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Generate(inference_pb2.GenerateRequest(model=model, prompt="hi"),
                                    metadata=auth(stack.api_key))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, model


async def tenant_key(stack: StackInfo, plan: TenantPlan) -> str:
    tenant_id = f"t-{uuid.uuid4().hex[:8]}"
    async with etcd.connect(stack.etcd, 5.0, stack.client_tls()) as client:
        store = TenantStore(client)
        await store.put_tenant(Tenant(tenant_id, "test tenant", plan))
        key, _ = await store.issue_key(tenant_id)
    # The gateway sees new keys through its watch; wait until it does.
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        deadline = time.monotonic() + 10
        while True:
            try:
                await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=auth(key))
                return key
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                assert time.monotonic() < deadline, "the gateway never saw the new key"
                await asyncio.sleep(0.05)


async def test_over_concurrency_limit_is_resource_exhausted(stack: StackInfo):
    key = await tenant_key(stack, TenantPlan(max_concurrency=1))
    conv = Conversation(stack, key)
    await conv.send(start("long", stack.reference_model, "go on and on", max_tokens=1000))
    first_token = asyncio.Event()

    async def watch(frame):
        if frame.WhichOneof("frame") == "tokens":
            first_token.set()

    reader = asyncio.create_task(conv.read_until_final({"long"}, on_frame=watch))
    async with asyncio.timeout(10):
        await first_token.wait()
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(
                inference_pb2.GenerateRequest(model=stack.reference_model, prompt="hi"),
                metadata=auth(key))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrency=1" in raised.value.details()
    await conv.send(inference_pb2.ClientFrame(cancel=inference_pb2.Cancel(request_id="long")))
    async with asyncio.timeout(10):
        finals = await reader
    await conv.close()
    assert finals["long"].finish_reason == inference_pb2.CANCELLED


def test_every_service_answers_health_and_reflection(stack: StackInfo):
    for name in ("gateway", "registry", "ratelimit", "scheduler", "auditor", "sidecar"):
        with tls.blocking_channel(stack.endpoints[name], name, stack.client_tls()) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert "grpc.health.v1.Health" in services, name
            if name != "sidecar":
                assert any(s.startswith("infermesh.v1.") for s in services), (name, services)
        with urllib.request.urlopen(f"http://{stack.metrics[name]}/metrics", timeout=5) as r:
            assert b"python_info" in r.read(), name


@pytest.mark.operator
def test_meshctl_replicas_shows_what_the_scheduler_routes_on(stack: StackInfo):
    runner = CliRunner()
    table = runner.invoke(app, ["replicas", "--scheduler", stack.endpoints["scheduler"]])
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["REPLICA", "ZONE", "ROUTABLE", "BREAKER"]
    assert rows[0].split()[:4] == ["replica-0", "local", "yes", "closed"], rows
    as_json = runner.invoke(app, ["replicas", "--scheduler", stack.endpoints["scheduler"],
                                  "--json"])
    [replica] = json.loads(as_json.stdout)["replicas"]
    assert replica["replica_id"] == "replica-0" and replica["load_reported"]
    assert {load["triton_model"] for load in replica["loads"]} == set(replica["models"])
    models = {line.split()[-5] for line in rows}  # one line per model: its KV and queue
    assert models == set(replica["models"]) and len(models) >= 2
    # Both engines publish KV events: the scheduler's view of each cache comes from them.
    assert {view["source"] for view in replica["kv_views"]} == {"events"}, replica["kv_views"]
    assert all(line.split()[-1].startswith("events/") for line in rows), rows


async def test_audit_chain_verifies_and_detects_an_edit(stack: StackInfo, stack_dir, tmp_path):
    audit_dir = stack_dir / "data" / "auditor"
    deadline = time.monotonic() + 15
    while True:  # events are shipped asynchronously
        result = verify(audit_dir)
        assert result.ok, result
        if result.records >= 5:
            break
        assert time.monotonic() < deadline, f"too few audit records: {result.records}"
        await asyncio.sleep(0.2)
    copy = tmp_path / "auditor"
    shutil.copytree(audit_dir, copy)
    log_file = list_segments(copy)[0].log_path
    lines = log_file.read_text().splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if i >= 2 and '"tenant":"' in line)
    edited = re.sub(r'"tenant":"[^"]*"', '"tenant":"tampered"', lines[target], count=1)
    assert edited != lines[target], "no record field to edit"
    lines[target] = edited
    log_file.write_text("".join(lines))
    broken = verify(copy)
    assert not broken.ok
    assert broken.first_bad_sequence == target_sequence(lines[target])


def target_sequence(line: str) -> int:
    return int(re.search(r'"seq":\s*(\d+)', line).group(1))
