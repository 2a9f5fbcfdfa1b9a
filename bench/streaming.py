"""Streamed generation through the mesh vs directly to Triton, at several concurrencies.

Both paths use the same reference engine in the same run (the Triton model serving the reference
model's production version, `served_triton_model`); the direct path uses the gateway's own
Triton adapter, so the difference is what the mesh adds (auth, validation, admission, routing,
the extra gRPC hop, audit). The load comes from `CLIENT_PROCESSES` processes on both paths, so
that the client's GIL is not what the direct baseline measures at high concurrency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2

from backends.triton.adapter import EngineRequest, TritonAdapter
from bench.gateway_throughput import process_cpu_s
from bench.pools import client_pool
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from services.registry.client import RegistryClient

CLIENT_PROCESSES = 2
MIN_REQUESTS_PER_LEVEL = 32  # so that c1's percentiles rest on more than a handful of samples
PROMPT = "Summarise the trade-offs of continuous batching for a new engineer on the team."


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    ok: bool
    error: str = ""  # why it failed: a status code name and message


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens: int = 0  # streamed by the requests that succeeded


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def served_triton_model(stack: StackInfo, model: str) -> str:
    """The Triton model serving `model`'s production version in the stack (what the mesh
    routes to, so the direct path calls the same engine)."""

    async def lookup() -> str:
        async with RegistryClient(stack.endpoints["registry"], stack.api_key,
                              mesh_tls=stack.client_tls()) as registry:
            return (await registry.version(model)).triton_model_name

    return asyncio.run(lookup())


def direct_client(
    adapter: TritonAdapter, stack: StackInfo, max_tokens: int, triton_model: str,
    prompt: str = PROMPT, **sampling,
):
    """Request `index` straight to Triton, seeded by its index; `sampling`: more EngineRequest
    fields (e.g. min_tokens, temperature)."""

    async def one(index: int) -> Sample:
        request = EngineRequest(triton_model_name=triton_model, request_id=uuid.uuid4().hex,
                                prompt=prompt, max_tokens=max_tokens, seed=index, **sampling)
        started = time.perf_counter()
        ttft = 0.0
        tokens = 0
        try:
            async for chunk in adapter.generate(stack.endpoints["triton"], request):
                if chunk.text and not ttft:
                    ttft = time.perf_counter() - started
                tokens = chunk.completion_tokens
        except Exception as exc:  # a failed request is a sample too: counted, not fatal
            return Sample(0.0, 0, False, repr(exc))
        return Sample(ttft, tokens, True)

    return one


def mesh_client(
    stub: inference_pb2_grpc.InferenceStub, stack: StackInfo, max_tokens: int, model: str = "",
    prompt: str = PROMPT, timeout_s: float = 0.0, **sampling,
):
    """Request `index` through the gateway (default: the reference model), seeded by its index;
    `timeout_s` (0: the gateway's default) is its deadline; `sampling`: more SamplingParams
    fields."""
    metadata = (("authorization", f"Bearer {stack.api_key}"),)
    timeout = duration_pb2.Duration(seconds=int(timeout_s)) if timeout_s else None

    async def one(index: int) -> Sample:
        frame = inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, model=model or stack.reference_model, prompt=prompt,
            params=inference_pb2.SamplingParams(max_tokens=max_tokens, seed=index, **sampling),
            timeout=timeout))
        started = time.perf_counter()
        ttft = 0.0
        try:
            async for reply in stub.GenerateStream(iter([frame]), metadata=metadata):
                kind = reply.WhichOneof("frame")
                if kind == "tokens" and not ttft:
                    ttft = time.perf_counter() - started
                elif kind == "final":
                    error = reply.final.error
                    failed = (f"{error.code}: {error.message}"
                              if reply.final.HasField("error") else "")
                    return Sample(ttft, reply.final.usage.completion_tokens, not failed, failed)
        except grpc.aio.AioRpcError as exc:
            return Sample(0.0, 0, False, f"{exc.code().name}: {exc.details()}")
        return Sample(0.0, 0, False, "the stream ended without a Final")

    return one


async def drive(
    one: Callable[[int], Awaitable[Sample]], concurrency: int, requests: range, budget_s: float
) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    indices = iter(requests)
    started = time.perf_counter()

    async def worker() -> None:
        for index in indices:
            if time.perf_counter() - started > budget_s:
                return
            samples.append(await one(index))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


async def _client(
    path: str, stack: StackInfo, triton_model: str, concurrency: int, requests: range,
    max_tokens: int, budget_s: float,
) -> tuple[list[Sample], float]:
    if path == "direct":
        adapter = TritonAdapter(stack.client_tls())
        try:
            return await drive(direct_client(adapter, stack, max_tokens, triton_model),
                               concurrency, requests, budget_s)
        finally:
            await adapter.close()
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await drive(mesh_client(stub, stack, max_tokens), concurrency, requests, budget_s)


def client_process(*args) -> tuple[list[Sample], float]:
    """Runs in a pool process: one share of a level's load."""
    return asyncio.run(_client(*args))


def run_level(
    pool: concurrent.futures.ProcessPoolExecutor, path: str, stack: StackInfo,
    triton_model: str, concurrency: int, requests: int, max_tokens: int, budget_s: float,
) -> LevelResult:
    """`triton_model`: what the direct path calls."""
    shares = [s for s in (
        (concurrency // CLIENT_PROCESSES + (1 if i < concurrency % CLIENT_PROCESSES else 0), i)
        for i in range(CLIENT_PROCESSES)) if s[0] > 0]
    futures = []
    for share, i in shares:
        mine = range(i, requests, len(shares))
        futures.append(pool.submit(client_process, path, stack, triton_model, share, mine,
                                   max_tokens, budget_s))
    samples: list[Sample] = []
    elapsed = 0.0
    for future in futures:
        part, seconds = future.result()
        samples += part
        elapsed = max(elapsed, seconds)
    good = [s for s in samples if s.ok]
    ttfts = [s.ttft_s * 1000 for s in good]
    return LevelResult(
        concurrency=concurrency,
        requests=len(samples),
        errors=len(samples) - len(good),
        tokens=sum(s.tokens for s in good),
        tokens_per_s=sum(s.tokens for s in good) / elapsed,
        ttft_p50_ms=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_p99_ms=percentile(ttfts, 99),
    )


def compare(
    stack: StackInfo, levels: tuple[int, ...], max_tokens: int, requests_per_stream: int,
    budget_s: float, min_requests: int = MIN_REQUESTS_PER_LEVEL, warmup_requests: int = 8,
) -> dict[str, float]:
    figures: dict[str, float] = {}
    triton_model = served_triton_model(stack, stack.reference_model)
    with client_pool(CLIENT_PROCESSES) as pool:
        # Warm both paths (processes, channels, the engine's first steps) before measuring.
        for path in ("direct", "mesh"):
            run_level(pool, path, stack, triton_model, min(4, warmup_requests), warmup_requests,
                      4, budget_s)
        for concurrency in levels:
            requests = max(min_requests, concurrency * requests_per_stream)
            base = run_level(pool, "direct", stack, triton_model, concurrency, requests,
                             max_tokens, budget_s)
            cpu_before = process_cpu_s(stack.pids["gateway"])
            through = run_level(pool, "mesh", stack, triton_model, concurrency, requests,
                                max_tokens, budget_s)
            gateway_cpu_s = process_cpu_s(stack.pids["gateway"]) - cpu_before
            c = f"c{concurrency}"
            print(
                f"{c:>4}: direct {base.tokens_per_s:8.1f} tok/s ttft p50 {base.ttft_p50_ms:7.1f} "
                f"p99 {base.ttft_p99_ms:7.1f} ms ({base.requests} req, {base.errors} err) | "
                f"mesh {through.tokens_per_s:8.1f} tok/s ttft p50 {through.ttft_p50_ms:7.1f} "
                f"p99 {through.ttft_p99_ms:7.1f} ms ({through.requests} req, "
                f"{through.errors} err) | ratio {through.tokens_per_s / base.tokens_per_s:.3f}",
                flush=True,
            )
            figures.update({
                f"direct_tokens_per_s_{c}": round(base.tokens_per_s, 1),
                f"mesh_tokens_per_s_{c}": round(through.tokens_per_s, 1),
                f"mesh_over_direct_tokens_per_s_{c}":
                    round(through.tokens_per_s / base.tokens_per_s, 3),
                f"direct_ttft_p50_ms_{c}": round(base.ttft_p50_ms, 2),
                f"direct_ttft_p99_ms_{c}": round(base.ttft_p99_ms, 2),
                f"mesh_ttft_p50_ms_{c}": round(through.ttft_p50_ms, 2),
                f"mesh_ttft_p99_ms_{c}": round(through.ttft_p99_ms, 2),
                f"added_ttft_p50_ms_{c}": round(through.ttft_p50_ms - base.ttft_p50_ms, 2),
                f"added_ttft_p99_ms_{c}": round(through.ttft_p99_ms - base.ttft_p99_ms, 2),
                f"errors_{c}": base.errors + through.errors,
                # Per-generation work included, spread over its tokens.
                f"gateway_cpu_us_per_streamed_token_{c}":
                    round(gateway_cpu_s / max(1, through.tokens) * 1e6, 1),
            })
    return figures
