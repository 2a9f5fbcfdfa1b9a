"""A replica that has none of a version's files serves it once placed: its sidecar reads the
manifest from a real registry (over the mesh token), fetches the pinned blob into its own cache,
renders the version's Triton model and loads it — no filesystem shared with the registry. A blob
corrupted in the replica's cache is found at the next load and fetched again; a version larger
than the cache is refused with the budget named, and the version already serving keeps serving."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aetcd
import pytest
from google.protobuf import json_format

from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet
from deploy.local.stack import service_process, wait_serving
from infermesh.v1 import registry_pb2
from services.common import etcd
from services.common.net import LOOPBACK, free_port
from services.common.records import PlacementRecord
from services.common.tenancy import Tenant, TenantStore
from services.registry.blobs import file_digest
from services.registry.client import LocalFile, PushSource, RegistryClient
from services.registry.manifest import served_model_name
from tests.integration.test_sidecar import generate

pytestmark = pytest.mark.integration
MESH_TOKEN = "sidecar-fetch-test-token"
CACHE_BYTES = 3_000_000  # the replica's blob cache budget


@pytest.fixture(scope="module")
def registry(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fetch-registry")
    port = free_port()
    process = service_process("registry-fetch", "services.registry", root / "registry.log", port,
                              {"INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
                               "INFERMESH_MESH_TOKEN": MESH_TOKEN,
                               "INFERMESH_REGISTRY_BLOB_DIR": str(root / "blobs")})
    process.start()
    try:
        wait_serving(process, f"{LOOPBACK}:{port}", time.monotonic() + 30)
        yield f"{LOOPBACK}:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def replica(etcd_server: EtcdServer, registry: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    """One replica with an empty repository of its own and an empty blob cache."""
    replicas = ReplicaSet(tmp_path_factory.mktemp("fetch-replica"), etcd_server.endpoint, 1,
                          model_repository=None, models=[],
                          id_prefix=f"fetch-{uuid.uuid4().hex[:6]}",
                          sidecar_env={"INFERMESH_MESH_TOKEN": MESH_TOKEN,
                                       "INFERMESH_BLOB_CACHE_MAX_BYTES": str(CACHE_BYTES)})
    replicas.start()
    try:
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
async def client(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    async with etcd.connect(etcd_server.endpoint, 5.0) as etcd_client:
        yield etcd_client


async def push(registry: str, client: aetcd.Client, directory: pathlib.Path, name: str,
               blob_bytes: int) -> str:
    """Registers a reference-engine version of `name` pinning one random blob; its version id."""
    blob = directory / "engine.plan"
    directory.mkdir()
    blob.write_bytes(os.urandom(blob_bytes))
    digest, size = file_digest(blob)
    manifest = json_format.ParseDict({
        "name": name, "description": directory.name, "tokenizer": "whitespace",
        "engine": {"kind": "reference", "context_window": 512, "max_output_tokens": 64},
        "sampling": {"max_tokens": 4, "top_p": 1.0},
        "weights": [{"name": blob.name, "digest": digest, "size_bytes": size}],
    }, registry_pb2.ModelManifest())
    tenants = TenantStore(client)
    tenant = f"fetch-{uuid.uuid4().hex[:8]}"
    await tenants.put_tenant(Tenant(tenant, "sidecar fetch test"))
    admin_key, _ = await tenants.issue_key(tenant, role="admin")
    async with RegistryClient(registry, admin_key) as registry_client:
        deadline = time.monotonic() + 10
        while True:  # until the registry has seen the new key
            try:
                reply = await registry_client.push(
                    PushSource(manifest, [LocalFile(blob, digest, size)]), lambda _sent: None)
                return reply.version_id
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def record_of(client: aetcd.Client, replica_id: str) -> dict[str, Any]:
    value = await client.get(etcd.Keys.replica(replica_id).encode())
    return etcd.decode(value.value) if value else {}


async def until(client: aetcd.Client, replica_id: str, check, what: str,
                timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        record = await record_of(client, replica_id)
        if record and check(record):
            return record
        assert time.monotonic() < deadline, f"never {what}: {record}"
        await asyncio.sleep(0.1)


async def place(client: aetcd.Client, replica_id: str, generation: int,
                versions: dict[str, str]) -> None:
    await client.put(etcd.Keys.placement(replica_id).encode(), etcd.encode(
        PlacementRecord(frozenset(versions), generation, versions).encode()))


def corrupt_count(metrics_endpoint: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("infermesh_blob_cache_corrupt_blobs_total"))


async def test_a_replica_fetches_verifies_and_serves_a_placed_version(
    registry: str, replica: ReplicaSet, client: aetcd.Client, tmp_path: pathlib.Path
):
    (only,) = replica.replicas
    name = f"fetch-{uuid.uuid4().hex[:6]}"
    vid = await push(registry, client, tmp_path / "v1", name, 1_000_000)
    model = served_model_name(name, vid)
    cache = replica.root / only.replica_id / "blobs" / "sha256"
    assert not cache.exists() or not any(cache.iterdir())  # none of its files

    await place(client, only.replica_id, 1, {model: f"{name}@{vid}"})
    record = await until(client, only.replica_id, lambda r: model in r["models"], "loaded")
    assert record["version_ids"] == {model: vid}
    assert await generate(only.grpc_endpoint, model, 3) == 3
    (blob,) = cache.iterdir()  # fetched, verified, kept by digest
    pinned_digest = f"sha256:{blob.name}"

    # Corrupted on the replica's disk: found at the next load, removed and fetched again.
    blob.chmod(0o644)
    blob.write_bytes(b"not the bytes the version pins")
    await place(client, only.replica_id, 2, {})
    await until(client, only.replica_id, lambda r: model not in r["models"], "unloaded")
    corrupt_before = await asyncio.to_thread(corrupt_count, only.sidecar_metrics)
    await place(client, only.replica_id, 3, {model: f"{name}@{vid}"})
    await until(client, only.replica_id, lambda r: model in r["models"], "reloaded")
    assert file_digest(cache / blob.name)[0] == pinned_digest
    assert await asyncio.to_thread(corrupt_count, only.sidecar_metrics) == corrupt_before + 1

    # A version larger than the whole cache: refused naming the budget; the first keeps serving.
    big = await push(registry, client, tmp_path / "big", name, CACHE_BYTES + 1)
    big_model = served_model_name(name, big)
    await place(client, only.replica_id, 4,
                {model: f"{name}@{vid}", big_model: f"{name}@{big}"})
    record = await until(client, only.replica_id,
                         lambda r: big_model in r["placement_errors"], "refused")
    assert "INFERMESH_BLOB_CACHE_MAX_BYTES" in record["placement_errors"][big_model]
    assert model in record["models"] and big_model not in record["models"]
    assert await generate(only.grpc_endpoint, model, 3) == 3
    await client.delete(etcd.Keys.placement(only.replica_id).encode())
