"""The Registry service over gRPC (its real `setup`, an in-process server, a real etcd): keys and
roles, chunked resumable blob uploads verified before they are visible, push from a directory,
`show --json` round-tripping into push, and routing changes through the client library."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import time
import uuid

import grpc
import pytest
from google.protobuf import json_format

from infermesh.v1 import registry_pb2, registry_pb2_grpc
from services.common import errors
from services.registry.blobs import LocalBlobStore, file_digest
from services.registry.client import LocalFile, RegistryClient, load_push_source
from tests.integration.registries import in_process_registry

pytestmark = pytest.mark.integration


def manifest_json(name: str, description: str) -> dict:
    return {
        "name": name, "description": description, "tokenizer": "huggingface",
        "engine": {"kind": "reference", "context_window": 2048, "max_output_tokens": 512,
                   "max_batch_size": 8,
                   "num_blocks": 64, "page_size": 32, "max_batch_tokens": 256,
                   "dtype": "float32", "gpu_memory_mib": 0},
        "sampling": {"max_tokens": 32, "temperature": 0.0, "top_p": 1.0},
        "cost_per_1k_input_tokens": 0.01, "cost_per_1k_output_tokens": 0.02,
        "weights": [{"name": "model.gguf"}],
        "tokenizer_files": [{"name": "tokenizer.json"}],
        "safety": {"blocked_phrases": ["forbidden words"]},
    }


class Registry:
    """The registry service on a free port of this process, with an admin and a user key."""

    def __init__(self, endpoint: str, admin_key: str, user_key: str):
        self.endpoint, self.admin_key, self.user_key = endpoint, admin_key, user_key

    def client(self, admin: bool = True) -> RegistryClient:
        return RegistryClient(self.endpoint, self.admin_key if admin else self.user_key)


@pytest.fixture
async def registry(etcd_server, tmp_path: pathlib.Path):
    async with in_process_registry(etcd_server.endpoint, tmp_path / "blobs") as running:
        yield Registry(running.endpoint, running.admin_key, running.user_key)


def write_model(directory: pathlib.Path, name: str, description: str) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.gguf").write_bytes(b"\x01weights" * 300_000)  # ~2.4 MB: three chunks
    (directory / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    manifest = manifest_json(name, description)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


async def test_keys_and_roles(registry):
    anonymous = registry_pb2_grpc.RegistryStub(grpc.aio.insecure_channel(registry.endpoint))
    with pytest.raises(grpc.aio.AioRpcError) as no_key:
        await anonymous.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=5)
    assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with registry.client(admin=False) as user:
        await user.models()  # reading is fine
        with pytest.raises(errors.PermissionDenied):
            await user.register(registry_pb2.ModelManifest(name="x"))
        with pytest.raises(errors.PermissionDenied):
            await user.change("x", "because", 0, rollback=registry_pb2.Rollback())
        with pytest.raises(errors.PermissionDenied):
            await user.upload(LocalFile(pathlib.Path(__file__), "sha256:" + "0" * 64, 1),
                              lambda _: None)


async def test_push_show_round_trip_and_routing(registry, tmp_path):
    name = f"m-{uuid.uuid4().hex[:8]}"
    write_model(tmp_path / "v1", name, "first")
    source = await asyncio.to_thread(load_push_source, str(tmp_path / "v1"))
    sent: list[int] = []
    async with registry.client() as admin:
        reply = await admin.push(source, sent.append)
        assert reply.created and sum(sent) == source.total_bytes
        again = await admin.push(source)
        assert (again.version_id, again.created) == (reply.version_id, False)
        shown = await admin.version(f"{name}@{reply.version_id}")
        # `show --json` is exactly what push takes: with the blobs in the registry, the
        # manifest alone registers the same version.
        exported = tmp_path / "exported.json"
        exported.write_text(json.dumps(json_format.MessageToDict(
            shown.manifest, preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True)))
        round_trip = await admin.push(await asyncio.to_thread(load_push_source, str(exported)))
        assert (round_trip.version_id, round_trip.created) == (reply.version_id, False)
        assert shown.manifest.weights[0].size_bytes == (tmp_path / "v1/model.gguf").stat().st_size
        assert shown.registered_by.endswith(tuple("0123456789abcdef"))

        write_model(tmp_path / "v2", name, "second")
        v2 = await admin.push(await asyncio.to_thread(load_push_source, str(tmp_path / "v2")))
        assert v2.created and v2.version_id != reply.version_id
        promoted = await admin.change(name, "launch",
                                      promote=registry_pb2.Promote(version_id=reply.version_id))
        assert (promoted.routing.revision, promoted.routing.production) == (1, reply.version_id)
        canary = await admin.change(name, "try v2", canary=registry_pb2.SetCanary(
            version_id=v2.version_id, weight_percent=5))
        assert canary.routing.canary == v2.version_id
        with pytest.raises(errors.FailedPrecondition):  # what this admin saw is stale now
            await admin.change(name, "late", 1, rollback=registry_pb2.Rollback())
        assert (await admin.version(f"{name}@canary")).version_id == v2.version_id
        history = await admin.history(name)
        assert [(e.action, e.reason) for e in history.entries] == [("promote", "launch"),
                                                                   ("canary", "try v2")]
        older = await admin.history(name, limit=1)
        assert [e.action for e in older.entries] == ["canary"]
        assert older.next_before_revision == 2
        page = await admin.history(name, limit=1, before_revision=older.next_before_revision)
        assert ([e.action for e in page.entries], page.next_before_revision) == (["promote"], 0)
        assert [v.version_id for v in await admin.versions(name)] == \
            [reply.version_id, v2.version_id]


async def test_a_manifest_pinning_a_missing_blob_is_refused(registry, tmp_path):
    manifest = manifest_json(f"m-{uuid.uuid4().hex[:8]}", "no blobs")
    manifest["weights"][0].update(digest="sha256:" + "1" * 64, size_bytes="10")
    manifest["tokenizer_files"][0].update(digest="sha256:" + "2" * 64, size_bytes="10")
    (tmp_path / "only-manifest.json").write_text(json.dumps(manifest))
    source = await asyncio.to_thread(load_push_source, str(tmp_path / "only-manifest.json"))
    assert source.files == []  # nothing local to upload: the registry must have them
    async with registry.client() as admin:
        with pytest.raises(errors.FailedPrecondition) as refused:
            await admin.push(source)
    assert "manifest.weights[0]" in refused.value.message


async def test_uploads_are_chunked_resumable_and_verified(registry, tmp_path):
    data = bytes(range(256)) * 12_000  # ~3 MB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    channel = grpc.aio.insecure_channel(registry.endpoint)
    stub = registry_pb2_grpc.RegistryStub(channel)
    metadata = (("authorization", f"Bearer {registry.admin_key}"),)

    def frames(offset: int, end: int, claimed: str = digest):
        yield registry_pb2.UploadBlobRequest(header=registry_pb2.BlobHeader(
            digest=claimed, size=len(data), offset=offset))
        for start in range(offset, end, 1 << 20):
            yield registry_pb2.UploadBlobRequest(chunk=data[start:min(start + (1 << 20), end)])

    # An upload that stops early leaves a resumable prefix, not a visible blob.
    partial = await stub.UploadBlob(frames(0, 1_500_000), metadata=metadata, timeout=10)
    assert (partial.complete, partial.uploaded_bytes) == (False, 1_500_000)
    status = await stub.GetBlobStatus(registry_pb2.GetBlobStatusRequest(digest=digest),
                                      metadata=metadata, timeout=5)
    assert (status.complete, status.uploaded_bytes) == (False, 1_500_000)
    with pytest.raises(grpc.aio.AioRpcError) as wrong_offset:
        await stub.UploadBlob(frames(0, len(data)), metadata=metadata, timeout=10)
    assert wrong_offset.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    done = await stub.UploadBlob(frames(1_500_000, len(data)), metadata=metadata, timeout=10)
    assert (done.complete, done.uploaded_bytes) == (True, len(data))
    # Bytes that do not hash to the announced digest never become visible.
    liar = "sha256:" + "3" * 64
    with pytest.raises(grpc.aio.AioRpcError) as mismatch:
        await stub.UploadBlob(frames(0, len(data), liar), metadata=metadata, timeout=10)
    assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await stub.GetBlobStatus(registry_pb2.GetBlobStatusRequest(digest=liar),
                                      metadata=metadata, timeout=5)
    assert (status.complete, status.uploaded_bytes) == (False, 0)
    # The client library resumes by itself, and counts what was already there.
    sent: list[int] = []
    async with registry.client() as admin:
        again = await admin.upload(LocalFile(path, digest, len(data)), sent.append)
    assert again.complete and sum(sent) == len(data)
    await channel.close()


async def test_one_upload_per_blob_at_a_time(registry):
    data = b"x" * 100_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    metadata = (("authorization", f"Bearer {registry.admin_key}"),)
    release = asyncio.Event()

    async def stalled():
        yield registry_pb2.UploadBlobRequest(header=registry_pb2.BlobHeader(
            digest=digest, size=len(data)))
        await release.wait()  # holds the upload open
        yield registry_pb2.UploadBlobRequest(chunk=data)

    async with grpc.aio.insecure_channel(registry.endpoint) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        first = asyncio.ensure_future(stub.UploadBlob(stalled(), metadata=metadata, timeout=10))
        await asyncio.sleep(0.3)  # the first upload holds the digest now
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.UploadBlob(iter([
                registry_pb2.UploadBlobRequest(header=registry_pb2.BlobHeader(
                    digest=digest, size=len(data))),
                registry_pb2.UploadBlobRequest(chunk=data)]), metadata=metadata, timeout=10)
        assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert (await first).complete


async def test_garbage_collection_frees_only_blobs_no_version_pins(registry, tmp_path):
    name = f"m-{uuid.uuid4().hex[:8]}"
    write_model(tmp_path / "v1", name, "kept")
    async with registry.client() as admin:
        kept = await admin.push(await asyncio.to_thread(load_push_source, str(tmp_path / "v1")))
        # A push that uploaded its blob and never registered (its manifest was refused).
        orphan = tmp_path / "orphan.bin"
        orphan.write_bytes(b"\x02left behind" * 1000)
        orphan_digest, orphan_size = file_digest(orphan)
        await asyncio.to_thread(LocalBlobStore(tmp_path / "blobs").put_file, orphan)
        blobs = sorted((tmp_path / "blobs" / "sha256").iterdir())
        for path in blobs:  # all of them old enough
            os.utime(path, (time.time() - 7200, time.time() - 7200))
        with pytest.raises(errors.InvalidArgument, match="grace"):
            await admin.collect_garbage(60, dry_run=True, reason="")
        with pytest.raises(errors.InvalidArgument, match="reason"):
            await admin.collect_garbage(3600, dry_run=False, reason="")
        async with registry.client(admin=False) as user:
            with pytest.raises(errors.PermissionDenied):
                await user.collect_garbage(3600, dry_run=True, reason="")
        dry = await admin.collect_garbage(3600, dry_run=True, reason="")
        assert list(dry.deleted) == [orphan_digest] and dry.kept == len(blobs) - 1
        assert len(sorted((tmp_path / "blobs" / "sha256").iterdir())) == len(blobs)
        done = await admin.collect_garbage(3600, dry_run=False, reason="abandoned push")
        assert list(done.deleted) == [orphan_digest] and done.freed_bytes == orphan_size
        assert len(sorted((tmp_path / "blobs" / "sha256").iterdir())) == len(blobs) - 1
        # What a version pins stays: its manifest alone registers it again (blobs all there).
        source = await asyncio.to_thread(load_push_source, str(tmp_path / "v1"))
        again = await admin.register(source.manifest)
        assert (again.version_id, again.created) == (kept.version_id, False)
