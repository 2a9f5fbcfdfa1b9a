"""The TenantAdmin servicer: tenants, plans and API keys, for admin keys only.

Thin: decodes, checks the caller is an admin, calls `TenantStore`, encodes. Usage figures come
from the ratelimit service, which owns the month-to-date counts. Registered with
`add_servicer`, so a frame that does not parse is INVALID_ARGUMENT (after the key is checked),
never UNKNOWN.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from infermesh.v1 import (
    auditor_pb2,
    ratelimit_pb2,
    ratelimit_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)
from services.auditor.client import new_event
from services.common import errors, status
from services.common.auth import Authenticator
from services.common.discovery import ServiceDirectory
from services.common.frames import MalformedFrame
from services.common.tenancy import LIST_FIELDS, ApiKey, Tenant, TenantPlan, TenantStore
from services.gateway.pipeline import AuditSink

PLAN_FIELDS = [f.name for f in dataclasses.fields(TenantPlan)]


def apply_plan_update(plan: TenantPlan, update: tenants_pb2.PlanUpdate) -> TenantPlan:
    changes = {name: getattr(update, name) for name in PLAN_FIELDS if update.HasField(name)}
    for name in LIST_FIELDS:  # a StringList: set replaces the plan's list, even with none
        if name in changes:
            changes[name] = tuple(changes[name].values)
    return dataclasses.replace(plan, **changes)


# The latest instant a google.protobuf.Timestamp holds: 9999-12-31T23:59:59Z.
TIMESTAMP_MAX_S = 253_402_300_799
LATEST = "9999-12-31T23:59:59Z"


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    """A stored time as a Timestamp; one past the Timestamp's range (a key stored with a huge
    `expires_at` before it was bounded) is the latest it holds."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(min(unix_s, TIMESTAMP_MAX_S) * 1e9))
    return stamp


def encode_key(key: ApiKey) -> tenants_pb2.KeyInfo:
    """The key's times both as Timestamps and, for clients that predate them, as the deprecated
    Unix seconds."""
    info = tenants_pb2.KeyInfo(key_id=key.key_id, tenant_id=key.tenant_id, role=key.role,
                               created_at=key.created_at, expires_at=key.expires_at,
                               create_time=_timestamp(key.created_at))
    if key.expires_at:
        info.expire_time.CopyFrom(_timestamp(key.expires_at))
    return info


def requested_expiry(request: tenants_pb2.IssueKeyRequest) -> float:
    """Unix seconds the new key expires at (0: never): `expire_time` when set, else the
    deprecated `expires_at` (which the store checks)."""
    if not request.HasField("expire_time"):
        if request.expires_at > TIMESTAMP_MAX_S:
            raise errors.InvalidArgument("expires_at", f"must be at most {TIMESTAMP_MAX_S} "
                                         f"({LATEST}), got {request.expires_at:g}")
        return request.expires_at
    stamp = request.expire_time
    if not 0 <= stamp.nanos <= 999_999_999 or stamp.seconds > TIMESTAMP_MAX_S:
        raise errors.InvalidArgument("expire_time", f"must be a valid Timestamp no later than "
                                     f"{LATEST}")
    when = stamp.seconds + stamp.nanos / 1e9
    if when <= time.time():
        raise errors.InvalidArgument("expire_time", "must be a future time (unset: never)")
    return when


class TenantAdminServicer(tenants_pb2_grpc.TenantAdminServicer):
    """Every change is audited (actor = the admin key, before and after, never a clear key)."""

    def __init__(
        self, authenticator: Authenticator, store: TenantStore, directory: ServiceDirectory,
        timeout_s: float, audit: AuditSink, source: str,
    ):
        self._auth = authenticator
        self._store = store
        self._directory = directory
        self._timeout_s = timeout_s
        self._audit = audit
        self._source = source

    async def _call(self, request: Any, context: grpc.aio.ServicerContext, operation):
        """Runs `operation` for an admin caller and a request that parsed; every MeshError
        becomes its status."""
        try:
            authorization = dict(context.invocation_metadata() or ()).get("authorization")
            principal = self._auth.authenticate_admin(authorization)
            if isinstance(request, MalformedFrame):
                raise request.error()
            return await operation(f"key:{principal.key_id}@{principal.tenant_id}")
        except errors.MeshError as exc:
            await status.abort(context, exc)

    def _record(self, actor: str, action: str, target: str, before: Any, after: Any) -> None:
        self._audit.emit(new_event(
            self._source, uuid.uuid4().hex,
            admin=auditor_pb2.AdminRecord(
                actor=actor, action=action, target=target,
                before_json=json.dumps(before, sort_keys=True) if before is not None else "",
                after_json=json.dumps(after, sort_keys=True) if after is not None else "",
            ),
        ))

    async def _info(self, tenant: Tenant, revision: int) -> tenants_pb2.TenantInfo:
        info = tenants_pb2.TenantInfo(
            tenant_id=tenant.tenant_id, name=tenant.name, revision=revision,
            plan=tenants_pb2.Plan(**dataclasses.asdict(tenant.plan)),
        )
        stub = ratelimit_pb2_grpc.RateLimitStub(self._directory.channel("ratelimit"))
        try:
            usage = await stub.GetUsage(ratelimit_pb2.GetUsageRequest(tenant=tenant.tenant_id),
                                        timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # a brand-new tenant not seen yet
                raise status.from_rpc_error(exc) from exc
            return info
        info.month, info.tokens_used, info.slots_leased = (
            usage.month, usage.tokens_used, usage.slots_leased)
        return info

    async def CreateTenant(self, request, context):
        async def create(actor: str):
            tenant = Tenant(request.tenant_id, request.name or request.tenant_id,
                            apply_plan_update(TenantPlan(), request.plan))
            await self._store.create_tenant(tenant)
            self._record(actor, "tenants.create", tenant.tenant_id, None,
                         dataclasses.asdict(tenant))
            _, revision = await self._store.get_tenant(tenant.tenant_id)
            return await self._info(tenant, revision)

        return await self._call(request, context, create)

    async def UpdateTenant(self, request, context):
        async def update(actor: str):
            current, revision = await self._store.get_tenant(request.tenant_id)
            expected = request.expected_revision or revision
            tenant = Tenant(
                current.tenant_id,
                request.name if request.HasField("name") else current.name,
                apply_plan_update(current.plan, request.plan),
            )
            await self._store.update_tenant(tenant, expected)
            self._record(actor, "tenants.update", tenant.tenant_id,
                         dataclasses.asdict(current), dataclasses.asdict(tenant))
            _, revision = await self._store.get_tenant(tenant.tenant_id)
            return await self._info(tenant, revision)

        return await self._call(request, context, update)

    async def GetTenant(self, request, context):
        async def get(actor: str):
            tenant, revision = await self._store.get_tenant(request.tenant_id)
            return await self._info(tenant, revision)

        return await self._call(request, context, get)

    async def ListTenants(self, request, context):
        async def list_all(actor: str):
            tenants = await self._store.list_tenants()
            return tenants_pb2.ListTenantsResponse(tenants=[
                tenants_pb2.TenantInfo(tenant_id=t.tenant_id, name=t.name,
                                       plan=tenants_pb2.Plan(**dataclasses.asdict(t.plan)))
                for t in tenants
            ])

        return await self._call(request, context, list_all)

    async def IssueKey(self, request, context):
        async def issue(actor: str):
            clear, key = await self._store.issue_key(
                request.tenant_id, request.role or "user", requested_expiry(request))
            self._record(actor, "keys.issue", key.key_id, None, dataclasses.asdict(key))
            return tenants_pb2.IssuedKey(api_key=clear, key=encode_key(key))

        return await self._call(request, context, issue)

    async def RevokeKey(self, request, context):
        async def revoke(actor: str):
            key = await self._store.revoke_key(request.key_id)
            self._record(actor, "keys.revoke", key.key_id, dataclasses.asdict(key), None)
            return encode_key(key)

        return await self._call(request, context, revoke)

    async def ListKeys(self, request, context):
        async def list_keys(actor: str):
            keys = await self._store.list_keys(request.tenant_id or None)
            return tenants_pb2.ListKeysResponse(keys=[encode_key(k) for _, k in keys])

        return await self._call(request, context, list_keys)
