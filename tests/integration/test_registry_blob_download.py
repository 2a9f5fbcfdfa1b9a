"""DownloadBlob against a real registry (its `setup`, an in-process server, a real etcd) with a
mesh token: who may read blobs, resuming from an offset, refusing a blob corrupt on the
registry's disk, and a replica's BlobCache filled over it."""

from __future__ import annotations

import hashlib
import os
import pathlib

import grpc
import pytest
from pydantic import SecretStr

from infermesh.v1 import registry_pb2, registry_pb2_grpc
from services.common import errors
from services.common.discovery import mesh_token_interceptors
from services.registry.blob_cache import BlobCache
from services.registry.client import LocalFile, RegistryClient
from tests.integration.registries import in_process_registry

pytestmark = pytest.mark.integration

MESH_TOKEN = "mesh-secret-for-tests"
DATA = os.urandom(2_500_000)  # three chunks of at most 1 MiB
DIGEST = f"sha256:{hashlib.sha256(DATA).hexdigest()}"


class Registry:
    def __init__(self, endpoint: str, admin_key: str, user_key: str, blob_dir: pathlib.Path):
        self.endpoint, self.admin_key, self.user_key = endpoint, admin_key, user_key
        self.blob_dir = blob_dir
        self.channels: list[grpc.aio.Channel] = []

    def mesh_client(self, token: str = MESH_TOKEN) -> RegistryClient:
        """What a sidecar or gateway holds: a channel that adds the mesh token, no API key."""
        return RegistryClient.over(grpc.aio.insecure_channel(
            self.endpoint, interceptors=mesh_token_interceptors(token)))

    def stub(self, token: str = "") -> registry_pb2_grpc.RegistryStub:
        interceptors = mesh_token_interceptors(token) if token else None
        self.channels.append(grpc.aio.insecure_channel(self.endpoint, interceptors=interceptors))
        return registry_pb2_grpc.RegistryStub(self.channels[-1])


@pytest.fixture
async def registry(etcd_server, tmp_path: pathlib.Path):
    """A registry with a mesh token, holding DATA (uploaded with an admin key)."""
    source = tmp_path / "model.gguf"
    source.write_bytes(DATA)
    async with in_process_registry(etcd_server.endpoint, tmp_path / "blobs",
                                   mesh_token=SecretStr(MESH_TOKEN)) as served:
        async with RegistryClient(served.endpoint, served.admin_key) as admin:
            assert (await admin.upload(LocalFile(source, DIGEST, len(DATA)),
                                       lambda _: None)).complete
        running = Registry(served.endpoint, served.admin_key, served.user_key, tmp_path / "blobs")
        yield running
        for channel in running.channels:
            await channel.close()


async def read(client: RegistryClient, digest: str = DIGEST, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in client.download(digest, offset)])


async def test_the_mesh_token_reads_blobs_and_versions_without_a_key(registry):
    async with registry.mesh_client() as mesh:
        assert await read(mesh) == DATA
        await mesh.models()  # the reads a sidecar or gateway makes take the token too
    assert (await registry.stub(MESH_TOKEN).GetBlobStatus(
        registry_pb2.GetBlobStatusRequest(digest=DIGEST), timeout=5)).complete
    async with RegistryClient(registry.endpoint, registry.admin_key) as admin:
        assert await read(admin) == DATA  # an admin key may read them too


async def test_only_the_mesh_and_admins_may_download(registry):
    request = registry_pb2.DownloadBlobRequest(digest=DIGEST)
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        [r async for r in registry.stub().DownloadBlob(request, timeout=5)]
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as tenant:
        [r async for r in registry.stub().DownloadBlob(
            request, timeout=5, metadata=(("authorization", f"Bearer {registry.user_key}"),))]
    assert tenant.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with RegistryClient(registry.endpoint, registry.user_key) as user:
        with pytest.raises(errors.PermissionDenied):  # the status is readable, the bytes not
            await read(user)
    async with registry.mesh_client(token="not-the-mesh-token") as impostor:
        with pytest.raises(errors.Unauthenticated):
            await read(impostor)


async def test_a_download_resumes_from_an_offset_and_refuses_one_past_the_end(registry):
    async with registry.mesh_client() as mesh:
        assert await read(mesh, offset=1_500_000) == DATA[1_500_000:]
        assert await read(mesh, offset=len(DATA)) == b""
        with pytest.raises(errors.InvalidArgument) as past_end:
            await read(mesh, offset=len(DATA) + 1)
        assert past_end.value.field == "offset"
        with pytest.raises(errors.InvalidArgument) as negative:
            await read(mesh, offset=-1)
        assert negative.value.field == "offset"
        with pytest.raises(errors.NotFound):
            await read(mesh, digest="sha256:" + "0" * 64)
        with pytest.raises(errors.InvalidArgument) as malformed:
            await read(mesh, digest="sha256:nope")
        assert malformed.value.field == "digest"


async def test_the_first_response_carries_the_size_and_chunks_are_at_most_one_mib(registry):
    responses = [r async for r in registry.stub(MESH_TOKEN).DownloadBlob(
        registry_pb2.DownloadBlobRequest(digest=DIGEST, offset=10), timeout=10)]
    assert [r.size for r in responses] == [len(DATA)] + [0] * (len(responses) - 1)
    assert max(len(r.chunk) for r in responses) <= 1 << 20
    assert b"".join(r.chunk for r in responses) == DATA[10:]


async def test_a_blob_corrupt_on_the_registrys_disk_is_never_served_whole(registry):
    path = registry.blob_dir / "sha256" / DIGEST.split(":", 1)[1]
    path.chmod(0o644)
    path.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))
    async with registry.mesh_client() as mesh:
        with pytest.raises(errors.Internal):
            await read(mesh)


async def test_a_replica_cache_fills_from_the_registry(registry, tmp_path):
    async with registry.mesh_client() as mesh:
        cache = BlobCache(tmp_path / "cache", 10 << 20, mesh.download)
        partial = tmp_path / "cache" / "incoming" / f"{DIGEST.split(':', 1)[1]}.partial"
        partial.write_bytes(DATA[:1_000_000])  # what a killed sidecar left
        await cache.ensure([{"name": "model.gguf", "digest": DIGEST, "size_bytes": len(DATA)}],
                           pin="v1")
    assert cache.store.verified_path(DIGEST).read_bytes() == DATA
    assert cache.usage() == (len(DATA), 10 << 20)
