"""Global quota accuracy: three gateways admit one tenant's requests from their own local quota
leases; how close does the tenant's served rate stay to its configured output TPM?

Every gateway is kept saturated for WARMUP_S + WINDOW_S; the output tokens of the requests
admitted in the last WINDOW_S (after the initial burst is spent) are compared with the plan's
rate. `quota_global_error_pct` is how far over (+) or under (−) the plan the mesh served.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid

import grpc

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc

OUTPUT_TPM = 6_000
MAX_TOKENS = 20
WORKERS_PER_GATEWAY = 6
WARMUP_S = 15.0
WINDOW_S = 60.0


async def _worker(stack: StackInfo, endpoint: str, key: str, model: str, stop_at: float,
                  admitted: list[tuple[float, int]]) -> None:
    metadata = (("authorization", f"Bearer {key}"),)
    async with stack.channel("gateway", endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                reply = await stub.Generate(inference_pb2.GenerateRequest(
                    request_id=uuid.uuid4().hex, model=model, prompt="meter me",
                    params=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS)),
                    metadata=metadata, timeout=30)
                admitted.append((started, reply.usage.completion_tokens))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                await asyncio.sleep(0.05)  # refused: try again shortly, as a greedy client would


async def _measure(stack: StackInfo, endpoints: list[str], workers: int, warmup_s: float,
                   window_s: float) -> dict[str, float]:
    admin_md = (("authorization", f"Bearer {stack.api_key}"),)
    tenant_id = f"metered-{uuid.uuid4().hex[:6]}"
    async with stack.channel() as channel:
        admin = tenants_pb2_grpc.TenantAdminStub(channel)
        await admin.CreateTenant(tenants_pb2.CreateTenantRequest(
            tenant_id=tenant_id, plan=tenants_pb2.PlanUpdate(
                output_tokens_per_minute=OUTPUT_TPM, requests_per_minute=100_000,
                max_concurrency=1000)), metadata=admin_md, timeout=10)
        key = (await admin.IssueKey(tenants_pb2.IssueKeyRequest(tenant_id=tenant_id),
                                    metadata=admin_md, timeout=10)).api_key
    await asyncio.sleep(0.5)  # every gateway's key cache follows etcd
    admitted: list[tuple[float, int]] = []
    started = time.monotonic()
    stop_at = started + warmup_s + window_s
    await asyncio.gather(*(
        _worker(stack, endpoint, key, stack.reference_model, stop_at, admitted)
        for endpoint in endpoints for _ in range(workers)))
    window_start = started + warmup_s
    served = sum(tokens for at, tokens in admitted if window_start <= at < stop_at)
    allowed = OUTPUT_TPM * window_s / 60.0
    return {
        "quota_global_error_pct": round((served / allowed - 1.0) * 100.0, 2),
        "quota_window_tokens_served": served,
        "quota_window_tokens_allowed": round(allowed),
    }


def run(stack: StackInfo, state_dir: pathlib.Path, gateways: int = 3,
        workers: int = WORKERS_PER_GATEWAY, warmup_s: float = WARMUP_S,
        window_s: float = WINDOW_S) -> dict[str, float]:
    """The stack's gateway and `gateways` - 1 more, `workers` clients each."""
    extra = [ExtraGateway(stack, state_dir, name=f"gateway-q{i}") for i in range(2, gateways + 1)]
    for gateway in extra:
        gateway.start()
    try:
        figures = asyncio.run(_measure(stack, [stack.gateway] + [g.endpoint for g in extra],
                                       workers, warmup_s, window_s))
    finally:
        for gateway in extra:
            gateway.stop()
    print(f"quota accuracy over {gateways} gateways: served "
          f"{figures['quota_window_tokens_served']} output tokens in {window_s:.0f} s against "
          f"{figures['quota_window_tokens_allowed']} allowed "
          f"({figures['quota_global_error_pct']:+.2f} %)", flush=True)
    return figures
