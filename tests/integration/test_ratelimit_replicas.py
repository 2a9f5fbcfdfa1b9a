"""Two ratelimit replicas: each tenant is owned by one (rendezvous hashing over their etcd
registrations); when the owner goes away the gateway's quota code moves to the other, which picks
up the tenant's budget from etcd."""

from __future__ import annotations

import asyncio
import time

import pytest

from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import errors, etcd
from services.common.discovery import ServiceDirectory, rendezvous_owner
from services.common.net import free_port
from services.common.tenancy import Tenant, TenantPlan, TenantStore, parse_tenant
from services.gateway.quota import QuotaLeases
from tests.integration.test_ratelimit_service import ratelimit_process

pytestmark = pytest.mark.integration


async def wait_until(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_lost_replica_moves_its_tenants_and_budgets_follow(etcd_server, tmp_path):
    tenant = "moving-tenant"
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        await TenantStore(client).put_tenant(Tenant(tenant, "t", TenantPlan(
            monthly_token_budget=10_000)))
        ports = [free_port(), free_port()]
        replicas = [ratelimit_process(etcd_server.endpoint, port, tmp_path / f"rl-{i}.log")
                    for i, port in enumerate(ports)]
        for index, replica in enumerate(replicas):
            replica.env["INFERMESH_INSTANCE_ID"] = f"ratelimit-{index}"
            replica.start()
        tenants = etcd.WatchCache(client, etcd.Keys.tenants, parse_tenant)
        directory = ServiceDirectory(client, None)
        await tenants.start()
        await directory.start()
        quota = QuotaLeases(tenants, directory, "gateway-t", 2.0, fail_open=False)
        try:
            await wait_until(lambda: len(directory.endpoints("ratelimit")) == 2)
            endpoints = directory.endpoints("ratelimit")
            first_owner = rendezvous_owner(tenant, endpoints)
            grant = await quota.acquire_slot(tenant, "r1", 100, 50)
            await quota.release_slot(tenant, grant.slot_id, 100, 50)
            await quota.close()  # reports the usage to the owner, gives back the rest
            await asyncio.sleep(1.5)  # the owner writes budgets out every second
            owner_process = replicas[[f"127.0.0.1:{p}" for p in ports].index(first_owner)]
            assert owner_process.stop() == 0, owner_process.log_tail()
            await wait_until(lambda: directory.endpoints("ratelimit") == [
                e for e in endpoints if e != first_owner])
            assert directory.open_channels == 0  # the lost owner's channel went with it
            survivor = directory.endpoints("ratelimit")[0]
            assert rendezvous_owner(tenant, [survivor]) == survivor
            grant = await quota.acquire_slot(tenant, "r2", 10, 10)  # served by the survivor
            await quota.release_slot(tenant, grant.slot_id, 10, 10)
            await quota.close()
            usage = await ratelimit_pb2_grpc.RateLimitStub(directory.channel_to(survivor)).GetUsage(
                ratelimit_pb2.GetUsageRequest(tenant=tenant), timeout=5)
            assert usage.tokens_used == 150 + 20  # the lost owner's figure came from etcd
        finally:
            await directory.close()
            await tenants.stop()
            for replica in replicas:
                replica.stop()


async def test_fail_closed_refuses_when_no_replica_answers(etcd_server):
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        await TenantStore(client).put_tenant(Tenant("closed-tenant", "t", TenantPlan()))
        tenants = etcd.WatchCache(client, etcd.Keys.tenants, parse_tenant)
        directory = ServiceDirectory(client, None)
        await tenants.start()
        await directory.start()
        try:
            await wait_until(lambda: tenants.get("closed-tenant") is not None)
            await wait_until(lambda: not directory.endpoints("ratelimit"))
            closed = QuotaLeases(tenants, directory, "gateway-c", 1.0, fail_open=False)
            with pytest.raises(errors.Unavailable):
                await closed.acquire_slot("closed-tenant", "r", 1, 1)
            opened = QuotaLeases(tenants, directory, "gateway-o", 1.0, fail_open=True)
            grant = await opened.acquire_slot("closed-tenant", "r", 1, 1)
            assert grant.max_tokens == 1
            await opened.release_slot("closed-tenant", grant.slot_id, 1, 1)
        finally:
            await directory.close()
            await tenants.stop()
