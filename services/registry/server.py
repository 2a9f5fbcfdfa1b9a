"""The Registry gRPC servicer: authenticates, decodes, calls one domain object, encodes.

Reads need any valid API key; versions, routing and blob status also take the mesh token
(sidecars and gateways fetch what they serve with it). Every write (blob uploads, registrations,
routing changes) needs an admin key, whose identity (`tenant/key id`) is the actor in history and
in the audit log. Blob bytes are model weights: only the mesh token or an admin key reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from prometheus_client import Counter

from infermesh.v1 import registry_pb2, registry_pb2_grpc
from services.common import errors, etcd, status
from services.common.auth import Authenticator, Principal
from services.common.callers import mesh_caller
from services.common.discovery import ServiceDirectory
from services.common.frames import add_servicer
from services.common.runtime import ServiceContext, ServiceParts
from services.common.slo import load_slo_config
from services.common.tenancy import parse_key, parse_tenant
from services.registry import rollout
from services.registry.admin_audit import AdminAuditShipper
from services.registry.auto_rollback import AutoRollback
from services.registry.blobs import BlobStore, LocalBlobStore
from services.registry.catalog import ModelCatalog
from services.registry.manifest import ModelVersion, parse_ref
from services.registry.s3_blobs import S3BlobStore
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from services.registry.uploads import BlobUploads

UPLOAD_IDLE_TIMEOUT_S = 60.0
DEFAULT_GC_GRACE_S = 86400.0
BYTES_SENT = Counter("infermesh_registry_blob_bytes_sent_total",
                     "Blob bytes sent over DownloadBlob.")


def manifest_to_dict(manifest: registry_pb2.ModelManifest) -> dict[str, Any]:
    """The manifest's dict form: every field present, proto field names."""
    return json_format.MessageToDict(
        manifest, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def manifest_from_dict(manifest: dict[str, Any]) -> registry_pb2.ModelManifest:
    """A stored manifest as the API returns it. Fields the schema no longer has (e.g.
    `triton_model_name`, retired in issue 14) are left out, so an old version stays readable;
    its id no longer hashes from what is returned, so replicas refuse to serve it (re-push)."""
    return json_format.ParseDict(manifest, registry_pb2.ModelManifest(),
                                 ignore_unknown_fields=True)


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def encode_version(version: ModelVersion) -> registry_pb2.VersionInfo:
    return registry_pb2.VersionInfo(
        version_id=version.version_id, manifest=manifest_from_dict(version.manifest),
        registered_at=_timestamp(version.registered_at), registered_by=version.registered_by,
        triton_model_name=version.triton_model_name,
    )


def encode_routing(model: str, routing: rollout.Routing) -> registry_pb2.Routing:
    return registry_pb2.Routing(
        model=model, revision=routing.revision, production=routing.production,
        previous=routing.previous, canary=routing.canary,
        canary_weight_percent=routing.canary_weight_percent, shadow=routing.shadow,
        shadow_rate=routing.shadow_rate, updated_at=_timestamp(routing.updated_at),
        updated_by=routing.updated_by,
    )


def encode_entry(model: str, entry: rollout.HistoryEntry) -> registry_pb2.HistoryEntry:
    return registry_pb2.HistoryEntry(
        revision=entry.revision, action=entry.action, actor=entry.actor, reason=entry.reason,
        at=_timestamp(entry.at), before=encode_routing(model, entry.before),
        after=encode_routing(model, entry.after),
    )


def decode_change(request: registry_pb2.ChangeRoutingRequest) -> rollout.Change:
    which = request.WhichOneof("change")
    if which == "promote":
        return rollout.Promote(request.promote.version_id)
    if which == "canary":
        return rollout.SetCanary(request.canary.version_id, request.canary.weight_percent)
    if which == "clear_canary":
        return rollout.ClearCanary()
    if which == "shadow":
        return rollout.SetShadow(request.shadow.version_id, request.shadow.rate)
    if which == "clear_shadow":
        return rollout.ClearShadow()
    if which == "rollback":
        return rollout.Rollback()
    raise errors.InvalidArgument("change", "is required: promote, canary, clear_canary, shadow, "
                                 "clear_shadow or rollback")


def actor_of(principal: Principal) -> str:
    return f"{principal.tenant_id}/{principal.key_id}"


async def upload_chunks(
    request_iterator: AsyncIterator[registry_pb2.UploadBlobRequest], idle_timeout_s: float
) -> AsyncIterator[bytes]:
    """The chunks after the header; a client silent for `idle_timeout_s` ends the upload."""
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                message = await anext(request_iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"no upload data for {idle_timeout_s:g}s; resume from GetBlobStatus"
            ) from None
        if message.WhichOneof("part") != "chunk":
            raise errors.InvalidArgument("header", "must be sent once, as the first message")
        yield message.chunk


async def _next_chunk(reader: Iterator[bytes]) -> bytes | None:
    """One chunk from a worker thread, finished even if the call is cancelled meanwhile, so the
    reader is never closed while a thread is inside it."""
    step = asyncio.ensure_future(asyncio.to_thread(next, reader, None))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        await asyncio.wait([step])
        raise


async def blob_chunks(blobs: BlobStore, digest: str, offset: int) -> AsyncIterator[bytes]:
    """A complete blob's bytes from `offset` on, read in worker threads; only those bytes are
    read (a seek, or a ranged GET), so a resume near the end of a large blob starts at once and
    fits the deadline its caller sized to the bytes left. From 0 the store verifies the blob as
    it reads (Internal at the end on a mismatch), so a blob corrupt on the registry's disk is
    never served whole; a resume is verified by its reader, which holds the prefix."""
    reader = blobs.read(digest, offset)
    try:
        while (chunk := await _next_chunk(reader)) is not None:
            yield chunk
    finally:
        reader.close()


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(
        self, auth: Authenticator, store: RegistryStore, catalog: ModelCatalog,
        uploads: BlobUploads, blobs: BlobStore,
    ):
        self._auth = auth
        self._store = store
        self._catalog = catalog
        self._uploads = uploads
        self._blobs = blobs

    def _principal(self, context: grpc.aio.ServicerContext, admin: bool) -> Principal:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        if admin:
            return self._auth.authenticate_admin(authorization)
        return self._auth.authenticate(authorization)

    def _authorize(self, context: grpc.aio.ServicerContext, admin: bool) -> None:
        """Lets in the mesh services the caller table admits on their certificate (replicas,
        gateways: `callers.MODEL_FILES`), anyone else by an API key (an admin key when
        `admin`)."""
        if mesh_caller() is not None:
            return
        self._principal(context, admin)

    async def UploadBlob(self, request_iterator, context):
        try:
            self._principal(context, admin=True)
            try:
                async with asyncio.timeout(UPLOAD_IDLE_TIMEOUT_S):
                    first = await anext(request_iterator)
            except (StopAsyncIteration, TimeoutError):
                raise errors.InvalidArgument("header", "is required as the first message") from None
            if first.WhichOneof("part") != "header":
                raise errors.InvalidArgument("header", "is required as the first message")
            header = first.header
            blob = await self._uploads.upload(
                header.digest, header.size, header.offset,
                upload_chunks(request_iterator, UPLOAD_IDLE_TIMEOUT_S),
            )
        except errors.MeshError as exc:
            await status.abort_stream(context, exc, request_iterator)
        return registry_pb2.BlobStatus(
            digest=blob.digest, complete=blob.complete, uploaded_bytes=blob.uploaded_bytes
        )

    async def GetBlobStatus(self, request, context):
        try:
            self._authorize(context, admin=False)
            blob = await self._uploads.status(request.digest)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.BlobStatus(
            digest=blob.digest, complete=blob.complete, uploaded_bytes=blob.uploaded_bytes
        )

    async def DownloadBlob(self, request, context):
        try:
            self._authorize(context, admin=True)
            blob = await self._uploads.status(request.digest)
            if not blob.complete:
                raise errors.NotFound(f"blob {request.digest} is not in the store")
            if not 0 <= request.offset <= blob.uploaded_bytes:
                raise errors.InvalidArgument(
                    "offset", f"must be 0..size ({blob.uploaded_bytes}), not {request.offset}")
            first = True
            async with contextlib.aclosing(
                blob_chunks(self._blobs, request.digest, request.offset)
            ) as chunks:
                async for chunk in chunks:
                    BYTES_SENT.inc(len(chunk))
                    yield registry_pb2.DownloadBlobResponse(
                        size=blob.uploaded_bytes if first else 0, chunk=chunk)
                    first = False
            if first:  # nothing after `offset`: the size alone
                yield registry_pb2.DownloadBlobResponse(size=blob.uploaded_bytes)
        except errors.MeshError as exc:
            await status.abort(context, exc)

    async def RegisterVersion(self, request, context):
        try:
            principal = self._principal(context, admin=True)
            version, created = await self._store.register(
                manifest_to_dict(request.manifest), actor_of(principal)
            )
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.RegisterVersionResponse(version_id=version.version_id, created=created)

    async def GetVersion(self, request, context):
        """Read from etcd, not the watch cache: an admin sees what they just wrote."""
        try:
            self._authorize(context, admin=False)
            ref = parse_ref(request.ref, "ref")
            version_id = ref.version_id or (await self._store.routing(ref.name)).target(ref.alias)
            version = await self._store.version(ref.name, version_id) if version_id else None
            if version is None:
                raise errors.NotFound(f"{request.ref} names no registered version")
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return encode_version(version)

    async def ListVersions(self, request, context):
        try:
            self._authorize(context, admin=False)
            versions = await self._store.versions(request.model)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.ListVersionsResponse(versions=[encode_version(v) for v in versions])

    async def ListModels(self, request, context):
        try:
            self._authorize(context, admin=False)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.ListRegisteredModelsResponse(
            models=[
                registry_pb2.RegisteredModel(
                    name=entry.name, routing=encode_routing(entry.name, entry.routing),
                    version_count=len(entry.versions),
                )
                for entry in self._catalog.models()
            ]
        )

    async def GetRouting(self, request, context):
        try:
            self._authorize(context, admin=False)
            routing = await self._store.routing(request.model)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return encode_routing(request.model, routing)

    async def ChangeRouting(self, request, context):
        try:
            principal = self._principal(context, admin=True)
            entry = await self._store.change_routing(
                request.model, request.expected_revision, decode_change(request),
                actor_of(principal), request.reason,
            )
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.ChangeRoutingResponse(
            routing=encode_routing(request.model, entry.after),
            entry=encode_entry(request.model, entry),
        )

    async def ListHistory(self, request, context):
        try:
            self._principal(context, admin=False)
            entries, older = await self._store.history(request.model, request.limit,
                                                       request.before_revision)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.ListHistoryResponse(
            entries=[encode_entry(request.model, entry) for entry in entries],
            next_before_revision=older,
        )


    async def CollectGarbage(self, request, context):
        try:
            principal = self._principal(context, admin=True)
            grace_s = (request.grace.ToTimedelta().total_seconds()
                       if request.HasField("grace") else DEFAULT_GC_GRACE_S)
            collected = await self._store.collect_garbage(
                grace_s, request.dry_run, actor_of(principal), request.reason)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.CollectGarbageResponse(
            deleted=collected.deleted, freed_bytes=collected.freed_bytes,
            abandoned_uploads=collected.abandoned_uploads, kept=collected.kept)


async def setup(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings
    assert isinstance(settings, RegistrySettings)
    catalog = ModelCatalog()
    models: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
        ctx.etcd, etcd.Keys.models, etcd.parse_models_key,
        on_change=lambda: catalog.rebuild(models.items),
    )
    keys = etcd.WatchCache(ctx.etcd, etcd.Keys.apikeys, parse_key)
    tenants = etcd.WatchCache(ctx.etcd, etcd.Keys.tenants, parse_tenant)
    directory = ServiceDirectory(ctx.etcd, ctx.tls, ctx.settings.mesh_token.get_secret_value())
    for cache in (models, keys, tenants, directory):
        await cache.start()
    shipper = AdminAuditShipper(ctx.etcd, directory, settings.peer_timeout_s)
    await shipper.start()
    blobs: BlobStore
    if settings.blob_store == "s3":  # shared by every registry pod (docs/decisions.md)
        blobs = await asyncio.to_thread(S3BlobStore, settings.s3_location(), settings.blob_dir)
    else:
        blobs = await asyncio.to_thread(LocalBlobStore, settings.blob_dir)
    store = RegistryStore(ctx.etcd, blobs, source=f"registry/{settings.instance_id}")
    auto_rollback = None
    if settings.auto_rollback:
        auto_rollback = AutoRollback(
            ctx.etcd, catalog, store, await asyncio.to_thread(load_slo_config, settings.slo_config),
            settings.canary_policy(), settings.canary_check_interval_s,
            settings.canary_scrape_timeout_s,
        )
        await auto_rollback.start()
    add_servicer(  # a malformed frame → INVALID_ARGUMENT, never UNKNOWN
        ctx.server, RegistryServicer(Authenticator(keys, tenants), store, catalog,
                                     BlobUploads(blobs, settings.max_blob_bytes), blobs),
        registry_pb2.DESCRIPTOR.services_by_name["Registry"], refuse_malformed=True,
    )

    async def cleanup() -> None:
        if auto_rollback is not None:
            await auto_rollback.close()
        await shipper.close()
        await directory.close()
        for cache in (models, keys, tenants):
            await cache.stop()

    return ServiceParts(
        [registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name], cleanup=cleanup
    )
