"""The ratelimit service as a real process over real etcd: budgets survive a restart, and the
slots a dead gateway held come back when its lease lapses."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from deploy.local.stack import service_process
from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import etcd
from services.common.net import free_port
from services.common.processes import ChildProcess
from services.common.tenancy import Tenant, TenantPlan, TenantStore

pytestmark = pytest.mark.integration
TTL_S = 1.0


def ratelimit_process(etcd_endpoint: str, port: int, log_path) -> ChildProcess:
    return service_process("ratelimit-t", "services.ratelimit", log_path, port,
                           {"INFERMESH_ETCD_ENDPOINT": etcd_endpoint,
                            "INFERMESH_LEASE_TTL_S": str(TTL_S)})


async def lease(port: int, tenant: str, gateway: str, deadline_s: float = 15.0, **fields):
    """One Lease call, retried while the process is still starting."""
    request = ratelimit_pb2.LeaseRequest(tenant=tenant, gateway_id=gateway, **fields)
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ratelimit_pb2_grpc.RateLimitStub(channel)
        while True:
            try:
                return await stub.Lease(request, timeout=2)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or \
                        time.monotonic() - started > deadline_s:
                    raise
                await asyncio.sleep(0.1)


def allowance(**amounts) -> ratelimit_pb2.Allowance:
    return ratelimit_pb2.Allowance(**amounts)


async def test_budget_survives_restart_and_a_dead_gateways_slots_return(etcd_server, tmp_path):
    tenant = "budget-restart"
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        await TenantStore(client).put_tenant(Tenant(tenant, "t", TenantPlan(
            max_concurrency=1, monthly_token_budget=1000)))
    port = free_port()
    process = ratelimit_process(etcd_server.endpoint, port, tmp_path / "ratelimit-1.log")
    process.start()
    try:
        need = allowance(requests=1, input_tokens=10, output_tokens=20, slots=1)
        granted = await lease(port, tenant, "gateway-a", need=need, want=need)
        assert not granted.reason and granted.granted.slots == 1
        refused = await lease(port, tenant, "gateway-b", need=allowance(slots=1))
        assert refused.reason == "concurrency"
        # gateway-a reports its usage, then dies: its slot returns once the lease lapses.
        await lease(port, tenant, "gateway-a", used_input_tokens=10, used_output_tokens=15)
        await asyncio.sleep(TTL_S + 0.2)
        assert not (await lease(port, tenant, "gateway-b", need=allowance(slots=1))).reason
        await asyncio.sleep(1.5)  # past one budget flush
    finally:
        assert process.stop() == 0, process.log_tail()
    restarted = ratelimit_process(etcd_server.endpoint, port, tmp_path / "ratelimit-2.log")
    restarted.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ratelimit_pb2_grpc.RateLimitStub(channel)
            await lease(port, tenant, "gateway-c")  # waits for the restart
            usage = await stub.GetUsage(ratelimit_pb2.GetUsageRequest(tenant=tenant), timeout=2)
        assert usage.tokens_used == 25 and usage.monthly_token_budget == 1000
        big = await lease(port, tenant, "gateway-c",
                          need=allowance(requests=1, input_tokens=500, output_tokens=480))
        assert big.reason == "budget"
    finally:
        restarted.stop()
