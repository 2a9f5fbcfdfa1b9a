"""Streamed generation through the mesh vs directly to Triton, at several concurrencies.

Both paths use the same reference engine in the same run; the direct path uses the gateway's own
Triton adapter, so the difference is exactly what the mesh adds (auth, validation, admission,
routing, the extra gRPC hop, audit).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from backends.triton.adapter import EngineRequest, TritonAdapter
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc

PROMPT = "Summarise the trade-offs of continuous batching for a new engineer on the team."


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    ok: bool


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def run_level(
    one: Callable[[int], Awaitable[Sample]], concurrency: int, requests: int, budget_s: float
) -> LevelResult:
    """`requests` generations with `concurrency` in flight, stopping new ones after `budget_s`."""
    samples: list[Sample] = []
    counter = iter(range(requests))
    started = time.perf_counter()

    async def worker() -> None:
        for index in counter:
            if time.perf_counter() - started > budget_s:
                return
            samples.append(await one(index))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    good = [s for s in samples if s.ok]
    ttfts = [s.ttft_s * 1000 for s in good]
    return LevelResult(
        concurrency=concurrency,
        requests=len(samples),
        errors=len(samples) - len(good),
        tokens_per_s=sum(s.tokens for s in good) / elapsed,
        ttft_p50_ms=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_p99_ms=percentile(ttfts, 99),
    )


def direct(adapter: TritonAdapter, stack: StackInfo, max_tokens: int):
    async def one(index: int) -> Sample:
        request = EngineRequest(triton_model_name="reference", request_id=uuid.uuid4().hex,
                                prompt=PROMPT, max_tokens=max_tokens, seed=index)
        started = time.perf_counter()
        ttft = 0.0
        tokens = 0
        try:
            async for chunk in adapter.generate(stack.endpoints["triton"], request):
                if chunk.text and not ttft:
                    ttft = time.perf_counter() - started
                tokens = chunk.completion_tokens
        except Exception:
            return Sample(0.0, 0, False)
        return Sample(ttft, tokens, True)

    return one


def mesh(stub: inference_pb2_grpc.InferenceStub, stack: StackInfo, max_tokens: int):
    metadata = (("authorization", f"Bearer {stack.api_key}"),)

    async def one(index: int) -> Sample:
        frame = inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, model=stack.model, prompt=PROMPT,
            params=inference_pb2.SamplingParams(max_tokens=max_tokens, seed=index)))
        started = time.perf_counter()
        ttft = 0.0
        try:
            async for reply in stub.GenerateStream(iter([frame]), metadata=metadata):
                kind = reply.WhichOneof("frame")
                if kind == "tokens" and not ttft:
                    ttft = time.perf_counter() - started
                elif kind == "final":
                    ok = not reply.final.HasField("error")
                    return Sample(ttft, reply.final.usage.completion_tokens, ok)
        except grpc.aio.AioRpcError:
            pass
        return Sample(0.0, 0, False)

    return one


async def compare(
    stack: StackInfo, levels: tuple[int, ...], max_tokens: int, requests_per_stream: int,
    budget_s: float,
) -> dict[str, float]:
    adapter = TritonAdapter()
    figures: dict[str, float] = {}
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        # Warm both paths (channels, the engine's first step) before measuring.
        await run_level(direct(adapter, stack, 4), 4, 8, budget_s)
        await run_level(mesh(stub, stack, 4), 4, 8, budget_s)
        for concurrency in levels:
            requests = concurrency * requests_per_stream
            base = await run_level(direct(adapter, stack, max_tokens), concurrency, requests,
                                   budget_s)
            through = await run_level(mesh(stub, stack, max_tokens), concurrency, requests,
                                      budget_s)
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
                f"mesh_over_direct_tokens_per_s_{c}": round(through.tokens_per_s / base.tokens_per_s, 3),
                f"direct_ttft_p50_ms_{c}": round(base.ttft_p50_ms, 2),
                f"direct_ttft_p99_ms_{c}": round(base.ttft_p99_ms, 2),
                f"mesh_ttft_p50_ms_{c}": round(through.ttft_p50_ms, 2),
                f"mesh_ttft_p99_ms_{c}": round(through.ttft_p99_ms, 2),
                f"added_ttft_p50_ms_{c}": round(through.ttft_p50_ms - base.ttft_p50_ms, 2),
                f"added_ttft_p99_ms_{c}": round(through.ttft_p99_ms - base.ttft_p99_ms, 2),
                f"errors_{c}": base.errors + through.errors,
            })
    await adapter.close()
    return figures
