"""Two registry processes (`python -m services.registry`, as two pods run it) share one S3 bucket
(moto's server) and nothing else: a blob uploaded through one is downloadable through the other."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import sys
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import etcd
from services.common.discovery import mesh_token_interceptors
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess
from services.common.tenancy import Tenant, TenantStore
from services.registry.client import LocalFile, RegistryClient
from tests.s3_server import CREDENTIALS, MotoServer, s3_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration

MESH_TOKEN = "mesh-secret-for-tests"
DATA = os.urandom(3_000_000)
DIGEST = f"sha256:{hashlib.sha256(DATA).hexdigest()}"


async def wait_serving(endpoint: str, process: ChildProcess, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            assert process.alive(), process.log_tail()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"registry at {endpoint} not serving:\n{process.log_tail()}")


@pytest.fixture
async def registries(
    etcd_server, s3_server: MotoServer, tmp_path: pathlib.Path,  # noqa: F811
) -> AsyncIterator[tuple[list[str], str, pathlib.Path, str]]:
    """Two registry processes on one bucket, each with its own staging directory."""
    client = etcd.connect(etcd_server.endpoint, 5.0)
    tenants = TenantStore(client)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await tenants.put_tenant(Tenant(tenant, "shared bucket test"))
    admin_key, _ = await tenants.issue_key(tenant, role="admin")
    await client.close()
    bucket = s3_server.new_bucket()
    processes, endpoints = [], []
    try:
        for name in ("registry-a", "registry-b"):
            port = free_port()
            env = {**os.environ, **CREDENTIALS,
                   "INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
                   "INFERMESH_PORT": str(port), "INFERMESH_METRICS_PORT": "0",
                   "INFERMESH_INSTANCE_ID": f"{name}-{uuid.uuid4().hex[:6]}",
                   "INFERMESH_MESH_TOKEN": MESH_TOKEN,
                   "INFERMESH_REGISTRY_AUTO_ROLLBACK": "false",
                   "INFERMESH_REGISTRY_BLOB_STORE": "s3",
                   "INFERMESH_REGISTRY_BLOB_DIR": str(tmp_path / name / "staging"),
                   "INFERMESH_REGISTRY_S3_BUCKET": bucket,
                   "INFERMESH_REGISTRY_S3_PREFIX": "mesh/",
                   "INFERMESH_REGISTRY_S3_ENDPOINT_URL": s3_server.endpoint_url}
            process = ChildProcess(name, [sys.executable, "-m", "services.registry"],
                                   tmp_path / f"{name}.log", env=env)
            process.start()
            processes.append(process)
            endpoints.append(f"{LOOPBACK}:{port}")
        for endpoint, process in zip(endpoints, processes, strict=True):
            await wait_serving(endpoint, process)
        yield endpoints, admin_key, tmp_path, bucket
    finally:
        for process in processes:
            process.stop(grace_s=5.0)


async def test_a_blob_uploaded_through_one_registry_downloads_through_the_other(
    registries, s3_server: MotoServer,  # noqa: F811
):
    (one, other), admin_key, root, bucket = registries
    source = root / "model.gguf"
    source.write_bytes(DATA)
    async with RegistryClient(one, admin_key) as admin:
        assert (await admin.upload(LocalFile(source, DIGEST, len(DATA)), lambda _: None)).complete
    channel = grpc.aio.insecure_channel(other, interceptors=mesh_token_interceptors(MESH_TOKEN))
    try:
        mesh = RegistryClient.over(channel)  # what a sidecar holds: the mesh token, no key
        assert b"".join([chunk async for chunk in mesh.download(DIGEST)]) == DATA
        assert b"".join([chunk async for chunk in mesh.download(DIGEST, 2_000_000)]) == (
            DATA[2_000_000:])
    finally:
        await channel.close()
    # The bytes are in the bucket, verified, and in neither registry's own directory.
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [
        (f"mesh/sha256/{DIGEST[7:]}", len(DATA))]
    for name in ("registry-a", "registry-b"):
        staged = root / name / "staging"
        assert [p for p in staged.rglob("*") if p.is_file()] == []
