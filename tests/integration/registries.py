"""A real registry service for the integration tests: its own `setup`, served in this process on
a free loopback port over a real etcd, with an admin key and a user key of a fresh tenant."""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1._async import HealthServicer

from services.common import etcd
from services.common.runtime import ServiceContext, server_interceptors
from services.common.tenancy import Tenant, TenantStore
from services.registry.server import setup
from services.registry.settings import RegistrySettings


@dataclass(frozen=True)
class RunningRegistry:
    endpoint: str
    admin_key: str
    user_key: str


@contextlib.asynccontextmanager
async def in_process_registry(
    etcd_endpoint: str, blob_dir: pathlib.Path,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (), **settings: Any,
) -> AsyncIterator[RunningRegistry]:
    """`settings`: more RegistrySettings fields (e.g. a mesh token)."""
    client = etcd.connect(etcd_endpoint, 5.0)
    tenants = TenantStore(client)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await tenants.put_tenant(Tenant(tenant, "registry test"))
    admin_key, _ = await tenants.issue_key(tenant, role="admin")
    user_key, _ = await tenants.issue_key(tenant, role="user")
    registry_settings = RegistrySettings(etcd_endpoint=etcd_endpoint, blob_dir=blob_dir,
                                         instance_id=f"registry-test-{tenant}", **settings)
    server = grpc.aio.server(interceptors=[*server_interceptors(registry_settings, tls_on=False),
                                           *interceptors])
    parts = await setup(ServiceContext(registry_settings, server, client, HealthServicer()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield RunningRegistry(f"127.0.0.1:{port}", admin_key, user_key)
    finally:
        await server.stop(1)
        await parts.cleanup()
        await client.close()
