"""Prefix-cache isolation over the real stack (issue 15, class 9): a tenant whose plan has
`isolate_prefix_cache` never gets a prefix-cache hit from another tenant's identical prompt (so its
TTFT cannot tell what others sent), while its own repeats and shared tenants' prompts still hit."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import pytest

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_tenants_and_quotas import auth, new_tenant

pytestmark = pytest.mark.integration


def cached_prefill_tokens(stack: StackInfo) -> float:
    """Prompt tokens the reference engine found in its prefix cache, so far."""
    with urllib.request.urlopen(f"http://{stack.metrics['triton']}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = (f'model="{stack.triton_models[stack.reference_model]}"', 'cache="hit"')
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("infermesh_engine_prefill_tokens_total{")
               and all(w in line for w in wanted))


async def cached_by(stack: StackInfo, key: str, prompt: str) -> float:
    """How many of `prompt`'s tokens one generation found cached."""
    before = await asyncio.to_thread(cached_prefill_tokens, stack)
    async with stack.channel() as channel:
        await inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
            model=stack.reference_model, prompt=prompt,
            params=inference_pb2.SamplingParams(max_tokens=2)), metadata=auth(key), timeout=30)
    return await asyncio.to_thread(cached_prefill_tokens, stack) - before


async def test_an_isolated_tenant_gets_no_prefix_hit_from_another_tenants_prompt(stack):
    _, isolated_a = await new_tenant(stack, isolate_prefix_cache=True)
    _, isolated_b = await new_tenant(stack, isolate_prefix_cache=True)
    _, shared_c = await new_tenant(stack)
    _, shared_d = await new_tenant(stack)
    secret = " ".join(f"secret{uuid.uuid4().hex[:6]}" for _ in range(130))  # 2 blocks of 64
    assert await cached_by(stack, isolated_a, secret) == 0
    assert await cached_by(stack, isolated_b, secret) == 0  # A's prompt is invisible to B
    assert await cached_by(stack, shared_c, secret) == 0  # and to the tenants that share
    assert await cached_by(stack, isolated_a, secret) == 128  # A's own repeat still hits
    common = " ".join(f"common{uuid.uuid4().hex[:6]}" for _ in range(130))
    assert await cached_by(stack, shared_c, common) == 0
    assert await cached_by(stack, shared_d, common) == 128  # sharing tenants share
