"""The Registry API from the outside: what `meshctl registry`, the embedded stack and the
benchmarks call. Pushing a model uploads what the registry lacks (resumably), then registers.

`load_push_source` reads a model directory (its `manifest.json` beside the files) or a manifest
file: a file the manifest names that exists beside it is hashed and uploaded; one that does not
must carry its digest and size, and the registry must already hold it. A Hugging Face model
directory without manifest.json, or one `.gguf` file, gets its manifest derived (`hf_source`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from infermesh.v1 import registry_pb2, registry_pb2_grpc
from services.common import errors, status, tls
from services.common.discovery import ServiceDirectory
from services.registry import hf_source
from services.registry.blobs import CHUNK, file_digest, transfer_timeout_s
from services.registry.manifest import FILE_GROUPS, validate_manifest

MANIFEST_FILE = "manifest.json"

Progress = Callable[[int], None]  # called with the bytes just sent (or skipped as present)


@dataclass(frozen=True)
class LocalFile:
    path: pathlib.Path
    digest: str
    size: int


@dataclass(frozen=True)
class PushSource:
    manifest: registry_pb2.ModelManifest
    files: list[LocalFile]  # the pinned files found beside the manifest
    derived: bool = False  # the manifest was derived from the model's files, not read

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def load_push_source(source: str, name: str | None = None) -> PushSource:
    """Reads `DIR` (DIR/manifest.json), a manifest file, `-` (stdin), or a model as people have
    it: a Hugging Face model directory without manifest.json, or one `.gguf` file, whose
    manifest is derived from its own files (`hf_source`, named `name` or after the directory or
    file) and validated before anything is uploaded. Blocking file I/O (and, for a GGUF file,
    its first conversion).

    Raises InvalidArgument naming the field (or the model's file) when the manifest does not
    parse, a local file does not match the digest or size the manifest states, or a model
    cannot be served."""
    path = pathlib.Path(source)
    derived = None
    if source != "-" and path.is_dir() and not (path / MANIFEST_FILE).exists():
        derived = hf_source.from_hf_directory(path, name)
    elif source != "-" and path.suffix == ".gguf" and path.is_file():
        derived = hf_source.from_gguf(path, name)
    elif name is not None:
        raise errors.InvalidArgument(
            "--name", "names a derived manifest only (a model directory without manifest.json, "
            "or a .gguf file); a manifest names its model itself"
        )
    if derived is not None:
        raw, locate = derived.manifest, derived.paths.__getitem__
    else:
        raw, base = _read_manifest(source)
        locate = base.joinpath
    local: list[LocalFile] = []
    for group in FILE_GROUPS:
        for index, ref in enumerate(raw.get(group) or []):
            field = f"manifest.{group}[{index}]"
            file_name = ref.get("name", "") if isinstance(ref, dict) else ""
            candidate = locate(file_name) if file_name and "/" not in file_name else None
            if candidate is None or not candidate.is_file():
                if not ref.get("digest") or "size_bytes" not in ref:
                    raise errors.InvalidArgument(
                        field, f"{candidate or repr(file_name)} is not here, so the manifest must "
                        "give its digest and size_bytes (and the registry must hold it)"
                    )
                continue
            digest, size = file_digest(candidate)
            if ref.get("digest", digest) != digest:
                raise errors.InvalidArgument(
                    f"{field}.digest", f"{candidate} hashes to {digest}, not {ref['digest']}"
                )
            if int(ref.get("size_bytes", size)) != size:
                raise errors.InvalidArgument(
                    f"{field}.size_bytes", f"{candidate} has {size} bytes, not {ref['size_bytes']}"
                )
            ref["digest"], ref["size_bytes"] = digest, size
            local.append(LocalFile(candidate, digest, size))
    if derived is not None:
        validate_manifest(raw)  # a derived manifest the registry would refuse is a bug here
    try:
        manifest = json_format.ParseDict(raw, registry_pb2.ModelManifest())
    except json_format.ParseError as exc:
        raise errors.InvalidArgument("manifest", str(exc)) from None
    unique = {f.digest: f for f in local}  # the same bytes under two names upload once
    return PushSource(manifest, list(unique.values()), derived=derived is not None)


def _read_manifest(source: str) -> tuple[dict[str, Any], pathlib.Path]:
    """A manifest file's JSON object (`DIR/manifest.json`, a file, or `-`: stdin) and the
    directory its files are looked up in."""
    if source == "-":
        text, base = sys.stdin.read(), pathlib.Path.cwd()
    else:
        path = pathlib.Path(source)
        manifest_path = path / MANIFEST_FILE if path.is_dir() else path
        if not manifest_path.is_file():
            raise errors.InvalidArgument("source", f"{manifest_path} does not exist")
        text, base = manifest_path.read_text(), manifest_path.parent
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.InvalidArgument("manifest", f"is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise errors.InvalidArgument("manifest", "must be a JSON object")
    return raw, base


class RegistryClient:
    """One channel to a registry, every call authenticated with `api_key` and bounded by
    `timeout_s` (blob transfers: by their size). Errors come back as `errors.MeshError`."""

    def __init__(self, endpoint: str, api_key: str, timeout_s: float = 10.0,
                 mesh_tls: tls.MeshTls | None = None):
        """`mesh_tls`: the CA and this caller's mesh certificate (an operator's, for meshctl);
        None only against a plaintext-development registry."""
        self._attach(tls.channel(endpoint, "registry", mesh_tls), api_key, timeout_s, owned=True)

    @classmethod
    def over(
        cls, channel: grpc.aio.Channel, api_key: str = "", timeout_s: float = 10.0
    ) -> RegistryClient:
        """A client on a channel its owner closes, e.g. `ServiceDirectory.channel("registry")`,
        whose certificate admits it to model reads: inside the mesh no API key is needed."""
        client = cls.__new__(cls)
        client._attach(channel, api_key, timeout_s, owned=False)
        return client

    def _attach(self, channel: grpc.aio.Channel, api_key: str, timeout_s: float,
                owned: bool) -> None:
        self._channel = channel
        self._owns_channel = owned
        self._stub = registry_pb2_grpc.RegistryStub(channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout_s = timeout_s

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return await method(request, metadata=self._metadata,
                                timeout=timeout_s or self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise status.from_rpc_error(exc) from None

    async def upload(self, local: LocalFile, progress: Progress) -> registry_pb2.BlobStatus:
        """Uploads what the registry lacks of one file, from where an earlier try stopped."""
        blob = await self._call(self._stub.GetBlobStatus,
                                registry_pb2.GetBlobStatusRequest(digest=local.digest))
        if blob.complete:
            progress(local.size)
            return blob
        offset = blob.uploaded_bytes
        progress(offset)

        async def messages() -> AsyncIterator[registry_pb2.UploadBlobRequest]:
            yield registry_pb2.UploadBlobRequest(header=registry_pb2.BlobHeader(
                digest=local.digest, size=local.size, offset=offset))
            handle = await asyncio.to_thread(open, local.path, "rb")
            with handle:
                handle.seek(offset)
                while chunk := await asyncio.to_thread(handle.read, CHUNK):
                    yield registry_pb2.UploadBlobRequest(chunk=chunk)
                    progress(len(chunk))

        return await self._call(self._stub.UploadBlob, messages(), transfer_timeout_s(local.size))

    async def download(self, digest: str, offset: int = 0) -> AsyncIterator[bytes]:
        """A complete blob's bytes from `offset` on, in chunks as they arrive. From 0 the
        registry checks its own copy as it reads (the stream ends with Internal if it is
        corrupt); from a later offset it reads only the rest and cannot vouch for the bytes the
        caller already holds: the caller verifies the whole blob before using it. The deadline
        is proportional to the bytes left, from the size GetBlobStatus reports first; NotFound
        when the registry has no complete blob `digest`."""
        blob = await self._call(self._stub.GetBlobStatus,
                                registry_pb2.GetBlobStatusRequest(digest=digest))
        if not blob.complete:
            raise errors.NotFound(f"the registry has no complete blob {digest}")
        call = self._stub.DownloadBlob(
            registry_pb2.DownloadBlobRequest(digest=digest, offset=offset),
            metadata=self._metadata, timeout=transfer_timeout_s(blob.uploaded_bytes - offset))
        try:
            async for response in call:
                if response.chunk:
                    yield response.chunk
        except grpc.aio.AioRpcError as exc:
            raise status.from_rpc_error(exc) from None
        finally:
            call.cancel()  # the caller stopped early: end the stream (a no-op once it ended)

    async def push(
        self, source: PushSource, progress: Progress = lambda _: None
    ) -> registry_pb2.RegisterVersionResponse:
        for local in source.files:
            blob = await self.upload(local, progress)
            if not blob.complete:
                raise errors.Internal(f"the registry did not complete {local.digest}")
        return await self.register(source.manifest)

    async def register(
        self, manifest: registry_pb2.ModelManifest
    ) -> registry_pb2.RegisterVersionResponse:
        return await self._call(self._stub.RegisterVersion,
                                registry_pb2.RegisterVersionRequest(manifest=manifest))

    async def version(self, ref: str) -> registry_pb2.VersionInfo:
        return await self._call(self._stub.GetVersion, registry_pb2.GetVersionRequest(ref=ref))

    async def versions(self, model: str) -> list[registry_pb2.VersionInfo]:
        reply = await self._call(self._stub.ListVersions,
                                 registry_pb2.ListVersionsRequest(model=model))
        return list(reply.versions)

    async def models(self) -> list[registry_pb2.RegisteredModel]:
        reply = await self._call(self._stub.ListModels, registry_pb2.ListRegisteredModelsRequest())
        return list(reply.models)

    async def routing(self, model: str) -> registry_pb2.Routing:
        return await self._call(self._stub.GetRouting, registry_pb2.GetRoutingRequest(model=model))

    async def change(
        self, model: str, reason: str, expected_revision: int | None = None, **change: Any
    ) -> registry_pb2.ChangeRoutingResponse:
        """One routing change, e.g. `change(m, why, promote=registry_pb2.Promote(...))`.

        Without `expected_revision` the change is made against the routing as read just now,
        so it still fails if another admin changes the model in between."""
        if expected_revision is None:
            expected_revision = (await self.routing(model)).revision
        return await self._call(self._stub.ChangeRouting, registry_pb2.ChangeRoutingRequest(
            model=model, expected_revision=expected_revision, reason=reason, **change))

    async def collect_garbage(
        self, grace_s: float, dry_run: bool, reason: str
    ) -> registry_pb2.CollectGarbageResponse:
        return await self._call(self._stub.CollectGarbage, registry_pb2.CollectGarbageRequest(
            grace=status.seconds_to_duration(grace_s), dry_run=dry_run, reason=reason))

    async def history(
        self, model: str, limit: int = 0, before_revision: int = 0
    ) -> registry_pb2.ListHistoryResponse:
        """One page of the model's changes, oldest first (`next_before_revision` for older)."""
        return await self._call(self._stub.ListHistory, registry_pb2.ListHistoryRequest(
            model=model, limit=limit, before_revision=before_revision))


def mesh_download(
    directory: ServiceDirectory, timeout_s: float
) -> Callable[[str, int], AsyncIterator[bytes]]:
    """Blob downloads from a live registry instance over the mesh's own channels (the caller's
    mesh identity, no API key): how a replica's sidecar and a gateway fetch a version's files."""

    async def download(digest: str, offset: int) -> AsyncIterator[bytes]:
        client = RegistryClient.over(directory.channel("registry"), timeout_s=timeout_s)
        async with contextlib.aclosing(client.download(digest, offset)) as chunks:
            async for chunk in chunks:  # closed early, the gRPC stream is cancelled at once
                yield chunk

    return download
