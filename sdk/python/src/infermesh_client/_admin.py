"""The admin surface of `AsyncClient`: tenants and keys (TenantAdmin, on the gateway), model
versions and rollouts (the registry), audit queries (the auditor). Each call has a deadline,
raises the client's typed errors and retries refusals that carry the server's delay, like a
generation. Changes need an admin key; reads of the registry and audit queries of one's own
tenant need any key."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

from google.protobuf import json_format

from infermesh_client import _admin_codec as codec
from infermesh_client import _proto
from infermesh_client._admin_types import (
    AuditRecord,
    GarbageCollection,
    HistoryPage,
    IssuedKey,
    KeyInfo,
    LocalBlob,
    PlanChange,
    RegisteredModel,
    RegisteredVersion,
    Routing,
    RoutingChange,
    Tenant,
    VersionInfo,
)
from infermesh_client._calls import Deadline, call_with_retries, serialize
from infermesh_client._errors import InvalidArgument, NotFound, ServerError

if TYPE_CHECKING:
    from infermesh_client._async_client import AsyncClient

# The deadline of a call other than a generation when neither it nor the client gives one.
DEFAULT_CALL_TIMEOUT_S = 10.0
ALIASES = ("production", "canary", "shadow", "previous")
VERSION_ID = re.compile(r"sha256:[0-9a-f]{64}")
MIN_PREFIX_HEX = 6
# Seconds for one RPC, or the deadline of the method that makes it (None: the default).
Timeout = Union[float, Deadline, None]
T = TypeVar("T")
# Blob uploads: chunks of 1 MiB (the registry takes up to 4), and a deadline that lets a file
# move at 4 MiB/s at least, never under a minute (the registry's own rule for its transfers).
UPLOAD_CHUNK = 1 << 20
UPLOAD_MIN_BYTES_PER_S = 4 << 20
UPLOAD_MIN_TIMEOUT_S = 60.0


class ServiceCalls:
    """Calls to one service of the mesh (`gateway`, `registry`, `auditor`) on the client's
    channel to it, with the key that came with its endpoint. `timeout` is seconds for one call,
    or the `Deadline` of a method that makes several."""

    def __init__(self, client: AsyncClient, service: str, api: str):
        self._client = client
        self._service = service
        self._api = api  # the .proto service, e.g. "infermesh.v1.Registry"

    async def unary(self, method: str, request: Any, timeout: Timeout) -> Any:
        path, _, response = _proto.rpc(self._api, method)
        channel, metadata = self._client._service_channel(self._service)
        call = channel.unary_unary(path, request_serializer=serialize,
                                   response_deserializer=response.FromString)
        return await call_with_retries(
            lambda remaining: call(request, timeout=remaining, metadata=metadata),
            self.deadline(timeout), self._client._retry)

    async def read_stream(self, method: str, request: Any, timeout: Timeout) -> list[Any]:
        """A server stream read to its end (read again from the start on a retried refusal)."""
        path, _, response = _proto.rpc(self._api, method)
        channel, metadata = self._client._service_channel(self._service)
        call = channel.unary_stream(path, request_serializer=serialize,
                                    response_deserializer=response.FromString)

        async def read(remaining: Optional[float]) -> list[Any]:
            return [item async for item in call(request, timeout=remaining, metadata=metadata)]

        return await call_with_retries(read, self.deadline(timeout), self._client._retry)

    def request(self, method: str, **fields: Any) -> Any:
        return _proto.rpc(self._api, method)[1](**fields)

    def method(self, method: str, kind: str = "unary_unary") -> Callable[..., Any]:
        """The RPC as a plain call (`kind`: the grpc channel's method kind) with the key's
        metadata, for a method that makes several RPCs in one attempt (see `retried`)."""
        path, _, response = _proto.rpc(self._api, method)
        channel, metadata = self._client._service_channel(self._service)
        call = getattr(channel, kind)(path, request_serializer=serialize,
                                      response_deserializer=response.FromString)
        return functools.partial(call, metadata=metadata)

    async def retried(self, attempt: Callable[[Optional[float]], Awaitable[T]],
                      deadline: Deadline) -> T:
        """`attempt(remaining seconds)` with the client's retries, within `deadline`."""
        return await call_with_retries(attempt, deadline, self._client._retry)

    def deadline(self, timeout: Timeout) -> Deadline:
        """The deadline of a method's RPCs: a method that makes several passes one along."""
        if isinstance(timeout, Deadline):
            return timeout
        if timeout is None:
            timeout = self._client._timeout
        return Deadline(DEFAULT_CALL_TIMEOUT_S if timeout is None else timeout)


class AsyncTenants:
    """Tenants and their plans (`client.admin.tenants`; an admin key)."""

    def __init__(self, calls: ServiceCalls):
        self._calls = calls

    async def create(self, tenant_id: str, *, name: str = "", plan: Optional[PlanChange] = None,
                     timeout: Optional[float] = None) -> Tenant:
        """A new tenant; plan fields left None take the defaults."""
        request = self._calls.request("CreateTenant", tenant_id=tenant_id, name=name)
        if plan is not None:
            codec.plan_update(plan, request.plan)
        return codec.tenant(await self._calls.unary("CreateTenant", request, timeout))

    async def update(self, tenant_id: str, *, name: Optional[str] = None,
                     plan: Optional[PlanChange] = None, expected_revision: int = 0,
                     timeout: Optional[float] = None) -> Tenant:
        """Changes only what is given. `expected_revision` (a `Tenant.revision` you read):
        FailedPrecondition when the tenant changed since; 0: the revision the server reads."""
        request = self._calls.request("UpdateTenant", tenant_id=tenant_id,
                                      expected_revision=expected_revision)
        if name is not None:
            request.name = name
        if plan is not None:
            codec.plan_update(plan, request.plan)
        return codec.tenant(await self._calls.unary("UpdateTenant", request, timeout))

    async def get(self, tenant_id: str, *, timeout: Optional[float] = None) -> Tenant:
        """The tenant with its plan, revision and this month's usage."""
        request = self._calls.request("GetTenant", tenant_id=tenant_id)
        return codec.tenant(await self._calls.unary("GetTenant", request, timeout))

    async def list(self, *, timeout: Optional[float] = None) -> list[Tenant]:
        reply = await self._calls.unary("ListTenants", self._calls.request("ListTenants"), timeout)
        return [codec.tenant(t) for t in reply.tenants]


class AsyncKeys:
    """API keys (`client.admin.keys`; an admin key)."""

    def __init__(self, calls: ServiceCalls):
        self._calls = calls

    async def issue(self, tenant_id: str, *, role: str = "user",
                    expires_at: Optional[datetime] = None,
                    timeout: Optional[float] = None) -> IssuedKey:
        """A new key of `tenant_id`; `IssuedKey.api_key` is the only time it is shown."""
        request = self._calls.request("IssueKey", tenant_id=tenant_id, role=role)
        if expires_at is not None:
            request.expire_time.FromDatetime(expires_at)
            # Also the deprecated seconds: a gateway that predates expire_time reads only them.
            request.expires_at = expires_at.timestamp()
        return codec.issued_key(await self._calls.unary("IssueKey", request, timeout))

    async def revoke(self, key_id: str, *, timeout: Optional[float] = None) -> KeyInfo:
        """Every gateway refuses the key within a second."""
        request = self._calls.request("RevokeKey", key_id=key_id)
        return codec.key_info(await self._calls.unary("RevokeKey", request, timeout))

    async def list(self, tenant_id: str = "", *,
                   timeout: Optional[float] = None) -> list[KeyInfo]:
        """The keys of `tenant_id` ("": every tenant's); never the keys themselves."""
        request = self._calls.request("ListKeys", tenant_id=tenant_id)
        return [codec.key_info(k) for k in (await self._calls.unary("ListKeys", request,
                                                                    timeout)).keys]


class AsyncAdmin:
    """`client.admin`: tenants and keys, served by the gateway."""

    def __init__(self, calls: ServiceCalls):
        self.tenants = AsyncTenants(calls)
        self.keys = AsyncKeys(calls)


class AsyncRegistry:
    """`client.registry`: model versions and their rollouts. A VERSION argument is a version
    id, a unique prefix of one (at least 6 hex digits), or an alias (production, canary,
    shadow, previous). Changes are compare-and-swap: without `expected_revision` against the
    routing as read just before, so a change made meanwhile by someone else is never undone;
    each is recorded with `reason` in the model's history and the audit log."""

    def __init__(self, calls: ServiceCalls):
        self._calls = calls

    async def models(self, *, timeout: Optional[float] = None) -> list[RegisteredModel]:
        request = self._calls.request("ListModels")
        reply = await self._calls.unary("ListModels", request, timeout)
        return [codec.registered_model(m) for m in reply.models]

    async def versions(self, model: str, *,
                       timeout: Optional[float] = None) -> list[VersionInfo]:
        """Every registered version of `model`, oldest first."""
        return await self._versions(model, timeout)

    async def version(self, ref: str, *, timeout: Optional[float] = None) -> VersionInfo:
        """`model` (its production version), `model@ALIAS`, `model@sha256:…` or `model@PREFIX`."""
        return await self._version(ref, self._calls.deadline(timeout))

    async def routing(self, model: str, *, timeout: Optional[float] = None) -> Routing:
        return await self._routing(model, timeout)

    async def history(self, model: str, *, limit: int = 0, before_revision: int = 0,
                      timeout: Optional[float] = None) -> HistoryPage:
        """The newest `limit` (0: 100) routing changes older than `before_revision` (0: up
        to the newest), oldest first."""
        request = self._calls.request("ListHistory", model=model, limit=limit,
                                      before_revision=before_revision)
        return codec.history_page(await self._calls.unary("ListHistory", request, timeout))

    async def promote(self, model: str, version: str, *, reason: str,
                      expected_revision: Optional[int] = None,
                      timeout: Optional[float] = None) -> RoutingChange:
        """VERSION serves the model; production until now becomes `previous`."""
        deadline = self._calls.deadline(timeout)
        version_id = await self._version_id(model, version, deadline)
        return await self._change(model, reason, expected_revision, deadline, "promote",
                                  version_id=version_id)

    async def canary(self, model: str, version: str, weight_percent: float, *, reason: str,
                     expected_revision: Optional[int] = None,
                     timeout: Optional[float] = None) -> RoutingChange:
        """A sticky `weight_percent` of tenants and users, in (0, 100], get VERSION."""
        deadline = self._calls.deadline(timeout)
        version_id = await self._version_id(model, version, deadline)
        return await self._change(model, reason, expected_revision, deadline, "canary",
                                  version_id=version_id, weight_percent=weight_percent)

    async def clear_canary(self, model: str, *, reason: str,
                           expected_revision: Optional[int] = None,
                           timeout: Optional[float] = None) -> RoutingChange:
        return await self._change(model, reason, expected_revision, timeout, "clear_canary")

    async def shadow(self, model: str, version: str, rate: float, *, reason: str,
                     expected_revision: Optional[int] = None,
                     timeout: Optional[float] = None) -> RoutingChange:
        """A share `rate`, in (0, 1], of requests is copied to VERSION (output discarded,
        never billed)."""
        deadline = self._calls.deadline(timeout)
        version_id = await self._version_id(model, version, deadline)
        return await self._change(model, reason, expected_revision, deadline, "shadow",
                                  version_id=version_id, rate=rate)

    async def clear_shadow(self, model: str, *, reason: str,
                           expected_revision: Optional[int] = None,
                           timeout: Optional[float] = None) -> RoutingChange:
        return await self._change(model, reason, expected_revision, timeout, "clear_shadow")

    async def rollback(self, model: str, *, reason: str, expected_revision: Optional[int] = None,
                       timeout: Optional[float] = None) -> RoutingChange:
        """Production and previous swap (the previous version is still loaded: no wait)."""
        return await self._change(model, reason, expected_revision, timeout, "rollback")

    async def push(self, manifest: Mapping[str, Any], files: Iterable[LocalBlob] = (), *,
                   progress: Optional[Callable[[int], None]] = None,
                   timeout: Optional[float] = None) -> RegisteredVersion:
        """Uploads what the registry lacks of `files` (resuming where an earlier try stopped),
        then registers `manifest`: a ModelManifest as its JSON mapping (the .proto field names,
        as `VersionInfo.manifest` gives it), whose `weights` and `tokenizer_files` pin the
        files by digest. `progress(n)`: n more bytes sent, or found there already. Each file
        has a deadline for its size (`timeout`, else at least a minute at 4 MiB/s). Registering
        the same manifest again changes nothing (`created` False). An admin key."""
        request = self._calls.request("RegisterVersion")
        try:
            json_format.ParseDict(dict(manifest), request.manifest)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"not a ModelManifest: {exc}", field="manifest") from None
        for blob in files:
            await self._upload(blob, progress or (lambda _: None), timeout)
        reply = await self._calls.unary("RegisterVersion", request, timeout)
        return codec.registered_version(reply)

    async def collect_garbage(self, *, reason: str = "", grace_seconds: Optional[float] = None,
                              dry_run: bool = False,
                              timeout: Optional[float] = None) -> GarbageCollection:
        """Deletes the blobs no registered version pins, and abandoned uploads, older than
        `grace_seconds` (None: the registry's default, a day); `reason` is required unless
        `dry_run` (which deletes nothing and says what would go). An admin key."""
        request = self._calls.request("CollectGarbage", reason=reason, dry_run=dry_run)
        if grace_seconds is not None:
            request.grace.FromNanoseconds(round(grace_seconds * 1e9))
        reply = await self._calls.unary("CollectGarbage", request, timeout)
        return codec.garbage_collection(reply)

    async def _upload(self, blob: LocalBlob, progress: Callable[[int], None],
                      timeout: Optional[float]) -> None:
        """One file, from the bytes the registry already holds; a retried attempt asks again
        where to start, and progress is never counted twice."""
        status_of = self._calls.method("GetBlobStatus")
        upload = self._calls.method("UploadBlob", "stream_unary")
        reported = 0

        def advance(to: int) -> None:
            nonlocal reported
            if to > reported:
                progress(to - reported)
                reported = to

        async def attempt(remaining: Optional[float]) -> None:
            status = await status_of(self._calls.request("GetBlobStatus", digest=blob.digest),
                                     timeout=remaining)
            if status.complete:
                advance(blob.size)
                return
            advance(status.uploaded_bytes)
            done = await upload(self._chunks(blob, status.uploaded_bytes, advance),
                                timeout=remaining)
            if not done.complete:
                raise ServerError(f"the registry did not complete {blob.digest}")

        if timeout is None:
            timeout = max(UPLOAD_MIN_TIMEOUT_S, blob.size / UPLOAD_MIN_BYTES_PER_S)
        await self._calls.retried(attempt, Deadline(timeout))

    async def _chunks(self, blob: LocalBlob, offset: int,
                      advance: Callable[[int], None]) -> AsyncIterator[Any]:
        message = _proto.message("infermesh.v1.UploadBlobRequest")
        yield message(header={"digest": blob.digest, "size": blob.size, "offset": offset})
        handle = await asyncio.to_thread(open, blob.path, "rb")
        with handle:
            handle.seek(offset)
            while True:
                chunk = await asyncio.to_thread(handle.read, UPLOAD_CHUNK)
                if not chunk:
                    return
                yield message(chunk=chunk)
                offset += len(chunk)
                advance(offset)

    async def _versions(self, model: str, timeout: Timeout) -> list[VersionInfo]:
        request = self._calls.request("ListVersions", model=model)
        reply = await self._calls.unary("ListVersions", request, timeout)
        return [codec.version_info(v) for v in reply.versions]

    async def _version(self, ref: str, deadline: Deadline) -> VersionInfo:
        model, _, version = ref.partition("@")
        if version and version not in ALIASES and not VERSION_ID.fullmatch(version):
            ref = f"{model}@{await self._id_from_prefix(model, version, deadline)}"
        request = self._calls.request("GetVersion", ref=ref)
        return codec.version_info(await self._calls.unary("GetVersion", request, deadline))

    async def _routing(self, model: str, timeout: Timeout) -> Routing:
        request = self._calls.request("GetRouting", model=model)
        return codec.routing(await self._calls.unary("GetRouting", request, timeout))

    async def _change(self, model: str, reason: str, expected_revision: Optional[int],
                      timeout: Timeout, change: str, **values: Any) -> RoutingChange:
        """ChangeRouting with `change` (the request's oneof member) holding `values`, all
        within one deadline."""
        deadline = self._calls.deadline(timeout)
        if expected_revision is None:
            expected_revision = (await self._routing(model, deadline)).revision
        request = self._calls.request("ChangeRouting", model=model, reason=reason,
                                      expected_revision=expected_revision)
        member = getattr(request, change)
        member.SetInParent()
        for name, value in values.items():
            setattr(member, name, value)
        return codec.routing_change(await self._calls.unary("ChangeRouting", request, deadline))

    async def _version_id(self, model: str, text: str, deadline: Deadline) -> str:
        """The version id VERSION names."""
        if VERSION_ID.fullmatch(text):
            return text
        if text in ALIASES:
            return (await self._version(f"{model}@{text}", deadline)).version_id
        return await self._id_from_prefix(model, text, deadline)

    async def _id_from_prefix(self, model: str, text: str, deadline: Deadline) -> str:
        prefix = text if text.startswith("sha256:") else f"sha256:{text}"
        if len(prefix) < len("sha256:") + MIN_PREFIX_HEX:
            raise InvalidArgument(f"{text!r}: give a version id, an alias, or at least "
                                  f"{MIN_PREFIX_HEX} hex digits of one", field="version")
        found = [v.version_id for v in await self._versions(model, deadline)
                 if v.version_id.startswith(prefix)]
        if len(found) != 1:
            raise NotFound(f"{text} matches {len(found)} versions of {model}, not one",
                           field="version")
        return found[0]


class AsyncAudit:
    """`client.audit`: records of the audit log. An admin key reads every tenant's; any other
    key only its own tenant's generations."""

    def __init__(self, calls: ServiceCalls):
        self._calls = calls

    async def query(self, *, tenant: str = "", since: Optional[datetime] = None,
                    until: Optional[datetime] = None, model: str = "", request_id: str = "",
                    limit: int = 0, timeout: Optional[float] = None) -> list[AuditRecord]:
        """Records appended in [since, until) matching the filters, oldest first; at most
        `limit` (0: 1000, and never more than the auditor's own query limit)."""
        request = self._calls.request("Query", tenant=tenant, model=model,
                                      request_id=request_id, limit=limit)
        if since is not None:
            request.since.FromDatetime(since)
        if until is not None:
            request.until.FromDatetime(until)
        return [codec.audit_record(r) for r in
                await self._calls.read_stream("Query", request, timeout)]
