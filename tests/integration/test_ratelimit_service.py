"""The ratelimit service as a real process over real etcd: budgets survive a restart, and the
slots of a gateway that died expire."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import grpc
import pytest

from deploy.local.stack import REPO_ROOT
from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import etcd, status
from services.common.net import free_port
from services.common.processes import ChildProcess
from services.common.tenancy import Tenant, TenantPlan, TenantStore

pytestmark = pytest.mark.integration


def ratelimit_process(etcd_endpoint: str, port: int, log_path) -> ChildProcess:
    return ChildProcess(
        "ratelimit", [sys.executable, "-m", "services.ratelimit"], log_path,
        env={**os.environ, "INFERMESH_ETCD_ENDPOINT": etcd_endpoint, "INFERMESH_PORT": str(port),
             "INFERMESH_METRICS_PORT": str(free_port()), "INFERMESH_INSTANCE_ID": "ratelimit-t"},
        cwd=REPO_ROOT,
    )


async def call(port: int, method: str, request, deadline_s: float = 15.0):
    """Retries while the process is still starting."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ratelimit_pb2_grpc.RateLimitStub(channel)
        while True:
            try:
                return await getattr(stub, method)(request, timeout=2)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or \
                        time.monotonic() - started > deadline_s:
                    raise
                await asyncio.sleep(0.1)


def acquire(tenant: str, hold_s: float, input_tokens=10, output_tokens=20):
    return ratelimit_pb2.AcquireRequest(
        tenant=tenant, request_id="r", hold=status.seconds_to_duration(hold_s),
        input_tokens=input_tokens, output_tokens=output_tokens)


async def test_budget_survives_restart_and_dead_gateway_slots_expire(etcd_server, tmp_path):
    tenant = "budget-restart"
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        await TenantStore(client).put_tenant(Tenant(tenant, "t", TenantPlan(
            max_concurrency=1, monthly_token_budget=1000)))
    port = free_port()
    process = ratelimit_process(etcd_server.endpoint, port, tmp_path / "ratelimit-1.log")
    process.start()
    try:
        grant = await call(port, "Acquire", acquire(tenant, 60))
        assert grant.allowed
        settled = await call(port, "Release", ratelimit_pb2.ReleaseRequest(
            tenant=tenant, slot_id=grant.slot_id, input_tokens_used=10, output_tokens_used=15))
        assert settled.released
        # A slot whose gateway never comes back: refused while held, free after its hold.
        held = await call(port, "Acquire", acquire(tenant, 0.5))
        assert held.allowed
        refused = await call(port, "Acquire", acquire(tenant, 0.5))
        assert not refused.allowed and refused.reason == "concurrency"
        await asyncio.sleep(0.6)
        assert (await call(port, "Acquire", acquire(tenant, 0.5))).allowed
        await asyncio.sleep(1.5)  # past one budget flush
    finally:
        assert process.stop() == 0, process.log_tail()
    restarted = ratelimit_process(etcd_server.endpoint, port, tmp_path / "ratelimit-2.log")
    restarted.start()
    try:
        usage = await call(port, "GetUsage", ratelimit_pb2.GetUsageRequest(tenant=tenant))
        assert usage.tokens_used == 25 and usage.monthly_token_budget == 1000
        big = await call(port, "Acquire", acquire(tenant, 5, input_tokens=500, output_tokens=480))
        assert not big.allowed and big.reason == "budget"
    finally:
        restarted.stop()
