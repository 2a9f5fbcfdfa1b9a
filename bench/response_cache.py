"""The response cache's gain: time to first token of a deterministic streamed request answered
by the engine (a miss) and of the same request repeated (a hit, from the gateway's cache).

A tenant of its own whose plan turns the cache on (the demo tenant's stays off: other benchmarks
repeat seeded requests and must reach the engine). Each sample is a fresh prompt at temperature
0, sent twice in a row on one stream; the figures are the p50 of each, over the reference model.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from bench.streaming import percentile
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc

PROMPT = "Describe the harbour at dawn in one paragraph."
KEY_WAIT_S = 10.0  # the gateway sees a new key through its watch


async def _tenant_key(stack: StackInfo, channel: grpc.aio.Channel) -> str:
    admin = tenants_pb2_grpc.TenantAdminStub(channel)
    metadata = (("authorization", f"Bearer {stack.api_key}"),)
    tenant_id = f"bench-cache-{uuid.uuid4().hex[:8]}"
    await admin.CreateTenant(tenants_pb2.CreateTenantRequest(
        tenant_id=tenant_id, plan=tenants_pb2.PlanUpdate(
            response_cache=True, requests_per_minute=1_000_000, max_concurrency=64)),
        metadata=metadata, timeout=10)
    issued = await admin.IssueKey(tenants_pb2.IssueKeyRequest(tenant_id=tenant_id),
                                  metadata=metadata, timeout=10)
    return issued.api_key


async def _streamed(stub: inference_pb2_grpc.InferenceStub, key: str, model: str, prompt: str,
                    max_tokens: int) -> tuple[float, bool]:
    """(seconds to the first text, whether usage says it was cached)."""
    frame = inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex, model=model, prompt=prompt,
        params=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    started = time.perf_counter()
    ttft = 0.0
    async for reply in stub.GenerateStream(iter([frame]), metadata=(
            ("authorization", f"Bearer {key}"),), timeout=60):
        kind = reply.WhichOneof("frame")
        if kind == "tokens" and not ttft:
            ttft = time.perf_counter() - started
        elif kind == "final":
            if reply.final.HasField("error"):
                raise RuntimeError(f"{reply.final.error.code}: {reply.final.error.message}")
            return ttft, reply.final.usage.cached
    raise RuntimeError("the stream ended without a Final")


async def _measure(stack: StackInfo, samples: int, max_tokens: int) -> dict[str, float]:
    async with stack.channel() as channel:
        key = await _tenant_key(stack, channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        deadline = time.monotonic() + KEY_WAIT_S
        while True:  # until the gateway's watch has the key
            try:
                await _streamed(stub, key, stack.reference_model, PROMPT, 1)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        misses, hits, errors = [], [], 0
        for index in range(samples):
            prompt = f"{PROMPT} ({index}: {uuid.uuid4().hex[:8]})"
            miss, miss_cached = await _streamed(stub, key, stack.reference_model, prompt,
                                                max_tokens)
            hit, hit_cached = await _streamed(stub, key, stack.reference_model, prompt,
                                              max_tokens)
            errors += int(miss_cached or not hit_cached)
            misses.append(miss)
            hits.append(hit)
    return {
        "response_cache_hit_ttft_ms_p50": round(percentile(hits, 50) * 1000, 2),
        "response_cache_miss_ttft_ms_p50": round(percentile(misses, 50) * 1000, 2),
        "response_cache_samples": samples,
        "response_cache_unexpected_errors": errors,  # a repeat not cached, or a first one cached
    }


def run(stack: StackInfo, samples: int = 40, max_tokens: int = 32) -> dict[str, float]:
    return asyncio.run(_measure(stack, samples, max_tokens))
