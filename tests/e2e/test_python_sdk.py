"""The Python SDK (`sdk/python`, `infermesh_client`) against the real stack, through the SDK
only: generations, one multiplexed stream, cancellation, quota retries, deadlines, typed errors,
`meshctl generate` on top of it, and the package installed into a clean venv."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import re
import shutil
import socket
import subprocess
import time
import uuid

import grpc
import pytest
from infermesh_client import (
    NO_RETRIES,
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from typer.testing import CliRunner

from deploy.local.stack import StackInfo
from meshctl.__main__ import app
from services.common.tenancy import TenantPlan
from tests.e2e.test_tenants_and_quotas import new_tenant, wait_tokens_used
from tests.e2e.test_walking_skeleton import engine_metrics, metric, reference, tenant_key

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]


class CallCounter:
    """Counts the calls a client makes, by method (`interceptors` for `AsyncClient`)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

        counter = self

        # grpc.aio files an interceptor under one kind only, so one class per kind.
        class Unary(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                counter.count(details)
                return await continuation(details, request)

        class Streams(grpc.aio.StreamStreamClientInterceptor):
            async def intercept_stream_stream(self, continuation, details, request_iterator):
                counter.count(details)
                return await continuation(details, request_iterator)

        class ServerStreams(grpc.aio.UnaryStreamClientInterceptor):
            async def intercept_unary_stream(self, continuation, details, request):
                counter.count(details)
                return await continuation(details, request)

        self.interceptors = [Unary(), Streams(), ServerStreams()]

    def count(self, details) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1


def cancelled_count(stack: StackInfo) -> float:
    return metric(engine_metrics(stack), "infermesh_engine_requests_total", outcome="cancelled",
                  **reference(stack))


async def engine_idle(stack: StackInfo, within_s: float = 10.0) -> None:
    """The reference engine runs nothing and has stopped generating."""
    deadline = time.monotonic() + within_s
    while metric(engine_metrics(stack), "nv_trt_llm_request_metrics", request_type="active",
                 **reference(stack)) != 0:
        assert time.monotonic() < deadline, "the engine still runs a request"
        await asyncio.sleep(0.05)
    generated = metric(engine_metrics(stack), "infermesh_engine_generated_tokens_total",
                       **reference(stack))
    await asyncio.sleep(0.3)
    assert metric(engine_metrics(stack), "infermesh_engine_generated_tokens_total",
                  **reference(stack)) == generated


def test_unary_and_streamed_generation(stack: StackInfo):
    with Client(stack.gateway, stack.api_key) as client:
        whole = client.generate(stack.reference_model, "Tell me about streams", max_tokens=12,
                                seed=3)
        with client.stream(stack.reference_model, "Tell me about streams", max_tokens=12,
                           seed=3) as stream:
            deltas = list(stream)
        chat = client.generate(stack.reference_model, messages=[("user", "Hello")], max_tokens=4)
        models = {model.name: model for model in client.models()}
    assert whole.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.model_version.startswith("sha256:") and whole.request_id
    assert whole.timings.time_to_first_token > 0 and whole.timings.total > 0
    assert len(deltas) >= 3 and all(d.result is None for d in deltas[:-1])
    result = deltas[-1].result
    assert result is not None and result == stream.result and deltas[-1].text == ""
    assert result.text == "".join(d.text for d in deltas) == whole.text
    assert (result.finish_reason, result.usage, result.model_version) == (
        "length", whole.usage, whole.model_version)
    assert chat.usage.completion_tokens == 4
    assert models[stack.reference_model].production_version == whole.model_version


async def test_32_concurrent_streams_share_one_generate_stream(stack: StackInfo):
    counter = CallCounter()
    async with AsyncClient(stack.gateway, stack.api_key,
                           interceptors=counter.interceptors) as client:

        async def one(seed: int):
            async with client.stream(stack.reference_model, f"story {seed}", max_tokens=16,
                                     seed=seed) as stream:
                texts = [delta.text async for delta in stream]
            return "".join(texts), stream.result

        results = await asyncio.gather(*(one(seed) for seed in range(32)))
    assert counter.calls == {"GenerateStream": 1}
    assert len({r.request_id for _, r in results}) == 32
    for text, result in results:
        assert result.finish_reason == "length" and result.usage.completion_tokens == 16
        assert text == result.text


async def test_breaking_out_cancels_on_the_engine_and_refunds_the_quota(stack: StackInfo):
    # A burst of 200 output tokens: a second 150 fits at once only if the first was refunded.
    tenant_id, key = await new_tenant(stack, output_tokens_per_minute=1200)
    before = cancelled_count(stack)
    async with AsyncClient(stack.gateway, key, retry=NO_RETRIES) as client:
        async with client.stream(stack.reference_model, "a long story please", max_tokens=150,
                                 seed=5) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
        assert stream.result is None
        deadline = time.monotonic() + 10
        while cancelled_count(stack) < before + 1:
            assert time.monotonic() < deadline, "the engine never recorded the cancellation"
            await asyncio.sleep(0.05)
        await engine_idle(stack)
        for _ in range(50):  # the refund is settled in the background after the Final
            try:
                second = await client.generate(stack.reference_model, "go", max_tokens=150)
                break
            except RateLimited:
                await asyncio.sleep(0.02)
    assert 0 < second.usage.completion_tokens <= 150
    used = await wait_tokens_used(stack, tenant_id, second.usage.total_tokens + 3)
    assert used < second.usage.total_tokens + 150


async def test_a_tenant_at_its_rpm_limit_waits_and_is_charged_once(stack: StackInfo):
    # 60 requests a minute: a burst of 10, then one a second.
    tenant_id, key = await new_tenant(stack, requests_per_minute=60)
    charged = 0
    async with AsyncClient(stack.gateway, key, retry=NO_RETRIES) as impatient:
        for _ in range(40):
            try:
                done = await impatient.generate(stack.reference_model, "hi", max_tokens=2)
                charged += done.usage.total_tokens
            except RateLimited as exc:
                refusal = exc
                break
        else:
            pytest.fail("the tenant was never at its limit")
    assert refusal.reason == "rpm" and 0 < refusal.retry_after <= 2
    counter = CallCounter()
    async with AsyncClient(stack.gateway, key, interceptors=counter.interceptors,
                           retry=RetryPolicy(max_attempts=5, max_wait=10)) as patient:
        started = time.monotonic()
        result = await patient.generate(stack.reference_model, "hi", max_tokens=2)
        waited = time.monotonic() - started
    assert counter.calls["Generate"] >= 2 and waited >= 0.2
    charged += result.usage.total_tokens
    assert await wait_tokens_used(stack, tenant_id, charged) == charged


async def test_a_200ms_deadline_on_a_long_generation(stack: StackInfo):
    async with AsyncClient(stack.gateway, stack.api_key) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.generate(stack.reference_model, "long", max_tokens=1000, timeout=0.2)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as raised:
            async with client.stream(stack.reference_model, "long", max_tokens=1000,
                                     timeout=0.2) as stream:
                async for _ in stream:
                    pass
        assert time.monotonic() - started < 1.0
    partial = raised.value.generation
    assert partial is not None and partial.finish_reason == "deadline"
    assert 0 < partial.usage.completion_tokens < 1000
    await engine_idle(stack)


async def test_typed_errors_from_real_refusals(stack: StackInfo):
    model = stack.reference_model
    async with AsyncClient(stack.gateway, "imk_not-a-real-key") as client:
        with pytest.raises(Unauthenticated):
            await client.generate(model, "hi")
        with pytest.raises(Unauthenticated):
            async with client.stream(model, "hi") as stream:
                await stream.until_done()
    async with AsyncClient(stack.gateway, stack.api_key) as client:
        with pytest.raises(InvalidArgument) as invalid:
            await client.generate(model, "hi", max_tokens=0)
        assert invalid.value.field == "params.max_tokens"
        with pytest.raises(InvalidArgument) as invalid:
            async with client.stream(model, "hi", stop=["a", "b", "c", "d", "e"]) as stream:
                await stream.until_done()
        assert invalid.value.field == "params.stop"
        with pytest.raises(NotFound):
            await client.generate("no-such-model", "hi")
        with pytest.raises(NotFound):
            await client.model("no-such-model")
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"
    async with AsyncClient(closed, stack.api_key) as client:
        with pytest.raises(Unavailable):
            await client.generate(model, "hi", timeout=5)
    # RESOURCE_EXHAUSTED for concurrency, while another generation holds the only slot.
    key = await tenant_key(stack, TenantPlan(max_concurrency=1))
    async with (
        AsyncClient(stack.gateway, key, retry=NO_RETRIES) as client,
        client.stream(model, "go on", max_tokens=1000) as long,
    ):
        await long.__anext__()
        with pytest.raises(RateLimited) as limited:
            await client.generate(model, "hi")
        assert limited.value.reason == "concurrency" and limited.value.retry_after is not None
    if "models" not in {f.name for f in dataclasses.fields(TenantPlan)}:
        pytest.skip("tenant plans have no model list in this tree")
    key = await tenant_key(stack, TenantPlan(models=("some-other-model",)))
    async with AsyncClient(stack.gateway, key) as client:
        with pytest.raises(PermissionDenied) as denied:
            await client.generate(model, "hi")
    assert denied.value.field == "model"


LAST_LINE = re.compile(r"finish_reason=(\w+) prompt_tokens=\d+ completion_tokens=(\d+) "
                       r"ttft_ms=[\d.]+ model_version=sha256:[0-9a-f]{64}")


def test_meshctl_generate_over_the_sdk(stack: StackInfo):
    runner = CliRunner()
    common = ["--model", stack.reference_model, "--gateway", stack.gateway,
              "--api-key", stack.api_key]
    streamed = runner.invoke(app, ["generate", "--stream", "--max-tokens", "6", "--seed", "2",
                                   *common, "Hello"])
    unary = runner.invoke(app, ["generate", "--max-tokens", "6", "--seed", "2", *common, "Hello"])
    cancelled = runner.invoke(app, ["generate", "--cancel-after", "3", "--max-tokens", "500",
                                    *common, "Hello"])
    refused = runner.invoke(app, ["generate", "--stream", "--max-tokens", "0", *common, "Hi"])
    assert streamed.exit_code == unary.exit_code == cancelled.exit_code == 0, streamed.output
    assert len(unary.stdout.split()) == 6  # the stream writes to the real stdout
    assert LAST_LINE.fullmatch(streamed.stderr.strip()).group(1, 2) == ("length", "6")
    assert LAST_LINE.fullmatch(cancelled.stderr.strip()).group(1, 2) == ("cancelled", "3")
    assert refused.exit_code == 3  # INVALID_ARGUMENT (meshctl.exits)
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: INVALID_ARGUMENT: params.max_tokens: must be 1..1024, got 0")


def test_the_package_installs_into_a_clean_venv_and_runs_an_example(
    stack: StackInfo, tmp_path: pathlib.Path
):
    """From the local source into a venv made from the system Python: the build compiles the
    protos, grpcio and protobuf come from pip's cache (or the registry); then an example runs."""
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(ROOT / "sdk" / "python")], check=True, timeout=240)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True,
                            capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in listed.split()}
    # typing_extensions is grpcio's own dependency
    assert names - {"pip", "setuptools", "wheel", "typing_extensions", "typing-extensions"} == {
        "infermesh-client", "grpcio", "protobuf"}
    env = {"PATH": os.environ["PATH"], "INFERMESH_GATEWAY": stack.gateway,
           "INFERMESH_API_KEY": stack.api_key, "INFERMESH_MODEL": stack.reference_model,
           "INFERMESH_REGISTRY": stack.endpoints["registry"],
           "INFERMESH_AUDITOR": stack.endpoints["auditor"], **stack.operator_env()}

    def example(name: str, *args: str) -> subprocess.CompletedProcess:
        shutil.copy(ROOT / "examples" / name, tmp_path)
        ran = subprocess.run([str(python), str(tmp_path / name), *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        return ran

    batch = example("batch_prompts.py", "--concurrency", "3")
    assert len(batch.stdout.splitlines()) == 6 and "0 failed" in batch.stderr
    tenant = f"venv-{uuid.uuid4().hex[:8]}"
    onboarded = example("admin_tasks.py", "onboard", tenant, "--rpm", "30").stdout
    assert onboarded.startswith(f"tenant {tenant}: standard, 30 rpm") and "imk_" in onboarded
    rollout = example("admin_tasks.py", "rollout", stack.reference_model).stdout
    production = rollout.splitlines()[0]
    assert " production " in production
