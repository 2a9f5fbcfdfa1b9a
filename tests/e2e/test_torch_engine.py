"""The real model end to end: the torch engine in the stack's one Triton, behind the gateway.

Every test reuses the session's stack (one Triton, its torch model loaded from the cached
conversion); the engine's state is read from Triton's metrics endpoint, as the scheduler reads it.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import time
import urllib.request

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from backends.triton.adapter import triton_client
from backends.triton.control import control_headers, read_token
from backends.triton.repository import render_torch_model
from backends.triton.weights import DEFAULT_MODEL, cache_root
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_tenants_and_quotas import new_tenant

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"


def auth(stack: StackInfo):
    return (("authorization", f"Bearer {stack.api_key}"),)


def chat(text: str) -> inference_pb2.Messages:
    return inference_pb2.Messages(messages=[inference_pb2.ChatMessage(role="user", content=text)])


def engine_metric(stack: StackInfo, name: str, **labels: str) -> float:
    """The sum of `name`'s samples for the torch model whose labels include `labels`."""
    with urllib.request.urlopen(f"http://{stack.metrics['triton']}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = [f'{k}="{v}"'
              for k, v in {"model": stack.triton_models[stack.model], **labels}.items()]
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in wanted)
    )


async def metric(stack: StackInfo, name: str, **labels: str) -> float:
    return await asyncio.to_thread(engine_metric, stack, name, **labels)


async def engine_requests(stack: StackInfo) -> float:
    return await metric(stack, "infermesh_engine_requests_total")


async def generate(stack: StackInfo, **fields) -> inference_pb2.GenerateResponse:
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await stub.Generate(inference_pb2.GenerateRequest(model=stack.model, **fields),
                                   metadata=auth(stack), timeout=120)


async def stream(stack: StackInfo, request_id: str, on_tokens=None, **fields):
    """One GenerateStream generation: (text, final). `on_tokens(count, send)` may send frames."""
    outbox: asyncio.Queue = asyncio.Queue()
    await outbox.put(inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id=request_id, model=stack.model, **fields)))

    async def frames():
        while (frame := await outbox.get()) is not None:
            yield frame

    pieces: list[str] = []
    async with stack.channel() as channel:
        call = inference_pb2_grpc.InferenceStub(channel).GenerateStream(
            frames(), metadata=auth(stack), timeout=120)
        async for frame in call:
            if frame.HasField("tokens"):
                pieces.append(frame.tokens.text)
                if on_tokens is not None:
                    await on_tokens(len(pieces), outbox.put)
            elif frame.HasField("final"):
                await outbox.put(None)
                return "".join(pieces), frame.final
    raise AssertionError("the stream ended without a Final")


async def test_greedy_chat_answers_paris_with_exact_prompt_tokens(stack: StackInfo):
    reply = await generate(stack, messages=chat(QUESTION),
                           params=inference_pb2.SamplingParams(max_tokens=32, temperature=0.0))
    assert "Paris" in reply.text, reply.text
    # The gateway rendered the model's own chat template and counted with its own tokenizer:
    # the engine, which tokenized the prompt itself, reports the same count.
    from transformers import AutoTokenizer  # the reference implementation, in the test only

    converted = next((cache_root() / "converted").iterdir())
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert 0 < reply.usage.completion_tokens <= 32
    assert reply.finish_reason == inference_pb2.STOP


async def test_an_isolated_tenants_cache_salt_reaches_the_torch_engine(stack: StackInfo):
    """The torch engine partitions its prefix cache by `cache_salt` (review fix, issue 19): the
    gateway now sends an isolated tenant's, and the torch model declares and takes it."""
    _, key = await new_tenant(stack, isolate_prefix_cache=True)
    async with stack.channel() as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(model=stack.model, messages=chat(QUESTION),
                                          params=inference_pb2.SamplingParams(
                                              max_tokens=8, temperature=0.0)),
            metadata=(("authorization", f"Bearer {key}"),), timeout=120)
    assert "Paris" in reply.text, reply.text


async def test_streamed_and_unary_texts_are_equal_for_the_same_seed(stack: StackInfo):
    params = inference_pb2.SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    reply = await generate(stack, messages=chat("Write a line about the sea."), params=params)
    text, final = await stream(stack, "seeded", messages=chat("Write a line about the sea."),
                               params=params)
    assert text == reply.text and text.strip()
    assert final.usage.completion_tokens == reply.usage.completion_tokens


async def test_eight_concurrent_streams_are_batched(stack: StackInfo):
    params = inference_pb2.SamplingParams(max_tokens=24, min_tokens=24, temperature=0.8)
    most_active = 0.0
    streams = [
        asyncio.create_task(stream(stack, f"batch-{i}", messages=chat(f"Count to {i + 3}."),
                                   params=params))
        for i in range(8)
    ]
    deadline = time.monotonic() + 120
    while not all(task.done() for task in streams) and time.monotonic() < deadline:
        most_active = max(most_active, await metric(stack, "nv_trt_llm_request_metrics",
                                                    request_type="active"))
        await asyncio.sleep(0.05)
    results = await asyncio.gather(*streams)
    for text, final in results:
        assert final.finish_reason == inference_pb2.LENGTH, final
        assert final.usage.completion_tokens == 24 and text
    assert most_active > 1, "the eight requests were never in one batch"


async def test_a_cancelled_stream_returns_its_kv_blocks(stack: StackInfo):
    cancelled_before = await metric(stack, "infermesh_engine_requests_total", outcome="cancelled")
    used_while_running: list[float] = []

    async def cancel_after_three(count: int, send) -> None:
        if count == 3:
            used_while_running.append(
                await metric(stack, "nv_trt_llm_kv_cache_block_metrics",
                             kv_cache_block_type="used"))
            await send(inference_pb2.ClientFrame(cancel=inference_pb2.Cancel(request_id="long")))

    _, final = await stream(
        stack, "long", on_tokens=cancel_after_three, messages=chat("Tell me a very long story."),
        params=inference_pb2.SamplingParams(max_tokens=400, min_tokens=400, temperature=0.7))
    assert final.finish_reason == inference_pb2.CANCELLED
    assert used_while_running and used_while_running[0] >= 1
    deadline = time.monotonic() + 15
    while True:
        used = await metric(stack, "nv_trt_llm_kv_cache_block_metrics",
                            kv_cache_block_type="used")
        free = await metric(stack, "nv_trt_llm_kv_cache_block_metrics",
                            kv_cache_block_type="free")
        total = await metric(stack, "nv_trt_llm_kv_cache_block_metrics",
                             kv_cache_block_type="max")
        cancelled = await metric(stack, "infermesh_engine_requests_total", outcome="cancelled")
        if used == 0 and free == total and cancelled == cancelled_before + 1:
            break
        assert time.monotonic() < deadline, (used, free, total, cancelled)
        await asyncio.sleep(0.1)
    assert await metric(stack, "nv_trt_llm_request_metrics", request_type="active") == 0


async def test_a_prompt_over_the_context_window_is_refused_at_the_gateway(stack: StackInfo):
    before = await engine_requests(stack)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate(stack, prompt="Paris is lovely. " * 600,
                       params=inference_pb2.SamplingParams(max_tokens=16))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details()
    assert details.startswith("prompt:") and "context window of 2048 tokens" in details, details
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate(stack, messages=chat("Paris is lovely. " * 600),
                       params=inference_pb2.SamplingParams(max_tokens=16))
    assert raised.value.details().startswith("messages:")
    assert await engine_requests(stack) == before  # nothing reached the engine


async def test_a_tampered_weights_blob_is_refused_not_served(
    stack: StackInfo, stack_dir: pathlib.Path, tmp_path: pathlib.Path
):
    """A second torch model whose weights blob was changed on disk: Triton refuses to load it."""
    source = stack_dir / "data" / "blobs" / "sha256" / DEFAULT_MODEL.digest.split(":", 1)[1]
    tampered = tmp_path / "blobs" / "sha256" / source.name
    tampered.parent.mkdir(parents=True)
    shutil.copyfile(source, tampered)
    with open(tampered, "r+b") as handle:  # one flipped byte, deep inside the weights
        handle.seek(tampered.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    manifest = {
        "weights": [{"name": DEFAULT_MODEL.file_name, "digest": DEFAULT_MODEL.digest}],
        "tokenizer_files": [],
        "engine": {"num_blocks": 8, "page_size": 32, "max_batch_tokens": 64},
    }
    folder = render_torch_model(stack_dir / "models", "smollm2-tampered", manifest,
                                tmp_path / "blobs", cache_root())
    try:
        control = control_headers(read_token(pathlib.Path(stack.triton_control_token_file)))
        async with triton_client(stack.endpoints["triton"], stack.client_tls()) as client:
            with pytest.raises(InferenceServerException) as raised:
                await client.load_model("smollm2-tampered", headers=control)
            assert "corrupt" in str(raised.value), raised.value
            assert not await client.is_model_ready("smollm2-tampered")
            # The good one is untouched.
            assert await client.is_model_ready(stack.triton_models[stack.model])
            # A refused model must not leave the server unready (strict readiness), or the
            # sidecar would take the whole replica out of routing.
            await client.unload_model("smollm2-tampered", headers=control)
            assert await client.is_server_ready()
    finally:
        shutil.rmtree(folder)
    # The sidecar may have seen the unready moment: the replica serves again within its polls.
    deadline = time.monotonic() + 20
    while True:
        try:
            await generate(stack, prompt="still there?",
                           params=inference_pb2.SamplingParams(max_tokens=1))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() < deadline, "the replica never came back"
            await asyncio.sleep(0.2)


@pytest.mark.operator  # the registry, and Triton (any mesh certificate)
def test_calibrate_writes_a_profile_the_reference_engine_can_run_with(
    stack: StackInfo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    from typer.testing import CliRunner

    from backends.triton.reference_engine import EngineConfig, StepTiming
    from meshctl.__main__ import app

    for variable, value in (("INFERMESH_REGISTRY", stack.endpoints["registry"]),
                            ("INFERMESH_TRITON", stack.endpoints["triton"]),
                            ("INFERMESH_TRITON_METRICS", stack.metrics["triton"]),
                            ("INFERMESH_API_KEY", stack.api_key)):
        monkeypatch.setenv(variable, value)
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, [
        "engine", "calibrate", stack.model, "--out", str(out), "--prompt-lengths", "8,96",
        "--batches", "1,3", "--decode-tokens", "6", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    profile = json.loads(out.read_text())
    assert profile["model"] == stack.model
    assert profile["triton_model_name"] == stack.triton_models[stack.model]
    assert profile["decode_step_ms"] + profile["decode_step_ms_per_request"] > 0
    assert profile["kv_tokens_per_block"] == 32 and profile["kv_blocks_per_request"] >= 1
    assert profile["max_active_requests"] >= 1
    assert len(profile["samples"]["prefill_tokens_seconds"]) == 2
    parameters = profile["reference_parameters"]
    EngineConfig(StepTiming(**{k: float(v) for k, v in parameters.items()
                               if k != "max_active_requests"}),
                 max_active_requests=int(parameters["max_active_requests"]))
