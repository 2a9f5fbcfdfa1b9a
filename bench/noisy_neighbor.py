"""Noisy neighbour: tenant A sends 10× its request quota beside a quiet tenant B.

B's TTFT p95 and queue wait are measured alone, then with A flooding, in the same run; A's
excess must be refused early and cheaply (its refusal latency is `shed_p99_ms`). The quota
decision itself (the gateway's `QuotaLeases.acquire_slot`, served from a local lease and topped
up from the ratelimit service when short) is timed on its own as `quota_decision_us_p99`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from bench.streaming import percentile
from deploy.local.stack import DEMO_TENANT, StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc
from services.common import etcd
from services.common.discovery import ServiceDirectory
from services.common.tenancy import parse_tenant
from services.gateway.quota import QuotaLeases

QUIET_RATE_PER_S = 2.0
NOISY_RPM = 120  # A's quota: 2 requests a second
NOISY_RATE_PER_S = 10 * NOISY_RPM / 60  # ten times over it
PHASE_S = 10.0
MAX_TOKENS = 32


async def _tenant(stub, admin_md, tenant_id: str, rpm: int) -> str:
    await stub.CreateTenant(tenants_pb2.CreateTenantRequest(
        tenant_id=tenant_id, plan=tenants_pb2.PlanUpdate(requests_per_minute=rpm,
                                                         max_concurrency=64)),
        metadata=admin_md, timeout=10)
    issued = await stub.IssueKey(tenants_pb2.IssueKeyRequest(tenant_id=tenant_id),
                                 metadata=admin_md, timeout=10)
    return issued.api_key


async def _one(stub, key: str, model: str) -> tuple[str, float, float]:
    """(outcome, ttft or refusal seconds, queue seconds) of one streamed generation."""
    frame = inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex, model=model, prompt="a steady question",
        params=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS)))
    started = time.perf_counter()
    ttft = 0.0
    async for reply in stub.GenerateStream(iter([frame]),
                                           metadata=(("authorization", f"Bearer {key}"),)):
        kind = reply.WhichOneof("frame")
        if kind == "tokens" and not ttft:
            ttft = time.perf_counter() - started
        elif kind == "final":
            if reply.final.HasField("error"):
                return reply.final.error.code, time.perf_counter() - started, 0.0
            return "ok", ttft, reply.final.timings.queue.ToTimedelta().total_seconds()
    return "lost", 0.0, 0.0


async def _open_loop(stub, key: str, model: str, rate_per_s: float, duration_s: float):
    """Sends at a fixed rate for `duration_s` regardless of replies (bounded: rate × duration)."""
    tasks = []
    started = time.perf_counter()
    for i in range(int(rate_per_s * duration_s)):
        delay = started + i / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(stub, key, model)))
    return await asyncio.gather(*tasks)


async def _decision_latency(stack: StackInfo, tenant: str, count: int = 2000) -> list[float]:
    """The gateway's own quota code (`QuotaLeases`) against the stack's ratelimit service: the
    time of each admit decision, most served from the lease held locally."""
    client = etcd.connect(stack.etcd, 5.0, stack.client_tls("gateway"))
    async with client:
        tenants = etcd.WatchCache(client, etcd.Keys.tenants, parse_tenant)
        directory = ServiceDirectory(client, stack.client_tls("gateway"), stack.mesh_token)
        await tenants.start()
        await directory.start()
        quota = QuotaLeases(tenants, directory, "bench", 2.0, fail_open=False)
        samples = []
        try:
            for _ in range(count):
                started = time.perf_counter()
                grant = await quota.acquire_slot(tenant, "bench", 10, 10)
                samples.append(time.perf_counter() - started)
                await quota.release_slot(tenant, grant.slot_id, 10, 10)
        finally:
            await quota.close()
            await directory.close()
            await tenants.stop()
        return samples


async def run(stack: StackInfo, phase_s: float = PHASE_S, decisions: int = 2000
              ) -> dict[str, float]:
    """Each phase sends for `phase_s`; `decisions`: quota decisions timed."""
    admin_md = (("authorization", f"Bearer {stack.api_key}"),)
    suffix = uuid.uuid4().hex[:6]
    async with stack.channel() as channel:
        admin = tenants_pb2_grpc.TenantAdminStub(channel)
        quiet_key = await _tenant(admin, admin_md, f"quiet-{suffix}", 10_000)
        noisy_key = await _tenant(admin, admin_md, f"noisy-{suffix}", NOISY_RPM)
        await asyncio.sleep(0.5)  # the gateway's key cache follows etcd
        stub = inference_pb2_grpc.InferenceStub(channel)
        alone = await _open_loop(stub, quiet_key, stack.reference_model, QUIET_RATE_PER_S, phase_s)
        quiet, noisy = await asyncio.gather(
            _open_loop(stub, quiet_key, stack.reference_model, QUIET_RATE_PER_S, phase_s),
            _open_loop(stub, noisy_key, stack.reference_model, NOISY_RATE_PER_S, phase_s),
        )
    timed = await _decision_latency(stack, DEMO_TENANT, decisions)  # a plan that never limits

    def p95_ttft_ms(results):
        return percentile([r[1] * 1000 for r in results if r[0] == "ok"], 95)

    def queue_ms(results):
        return statistics.median([r[2] * 1000 for r in results if r[0] == "ok"])

    shed = [r[1] * 1000 for r in noisy if r[0] == "RESOURCE_EXHAUSTED"]
    figures = {
        "noisy_neighbor_quiet_ttft_p95_ms_alone": round(p95_ttft_ms(alone), 2),
        "noisy_neighbor_quiet_ttft_p95_ms_with_noisy": round(p95_ttft_ms(quiet), 2),
        "noisy_neighbor_p95_ttft_ratio": round(p95_ttft_ms(quiet) / p95_ttft_ms(alone), 3),
        "noisy_neighbor_quiet_queue_p50_ms_alone": round(queue_ms(alone), 2),
        "noisy_neighbor_quiet_queue_p50_ms_with_noisy": round(queue_ms(quiet), 2),
        "noisy_neighbor_quiet_errors": sum(1 for r in alone + quiet if r[0] != "ok"),
        "noisy_neighbor_noisy_admitted": sum(1 for r in noisy if r[0] == "ok"),
        "noisy_neighbor_noisy_shed": len(shed),
        "shed_p99_ms": round(percentile(shed, 99), 2),
        "quota_decision_us_p99": round(percentile([d * 1e6 for d in timed], 99), 1),
        "quota_decision_us_p50": round(statistics.median(d * 1e6 for d in timed), 1),
    }
    print(f"noisy neighbour: quiet TTFT p95 {figures['noisy_neighbor_quiet_ttft_p95_ms_alone']} ms "
          f"alone, {figures['noisy_neighbor_quiet_ttft_p95_ms_with_noisy']} ms beside a tenant at "
          f"10x quota (ratio {figures['noisy_neighbor_p95_ttft_ratio']}); noisy admitted "
          f"{figures['noisy_neighbor_noisy_admitted']}, "
          f"shed {figures['noisy_neighbor_noisy_shed']} "
          f"(shed p99 {figures['shed_p99_ms']} ms); quota decision p99 "
          f"{figures['quota_decision_us_p99']} us", flush=True)
    return figures
