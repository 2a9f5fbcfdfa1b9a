"""Tenants, their plans and their API keys, as stored in etcd (shared by gateway, ratelimit and
meshctl). Keys are stored by sha256 only; the clear key is shown once, when it is issued.

    tenants/<tenant id>     {"schema", "tenant_id", "name", "plan": {...}}
    apikeys/<sha256 hex>    {"schema", "key_id", "tenant_id", "role", "created_at", "expires_at"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aetcd

from services.common import errors, etcd

SCHEMA = 1
KEY_PREFIX = "imk_"
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
KEY_ID = re.compile(r"^[0-9a-f]{12}$")
ROLES = ("user", "admin")
# Strict priority between classes, first served first; shed in the reverse order.
PRIORITY_CLASSES = ("premium", "standard", "free", "batch")


@dataclass(frozen=True)
class TenantPlan:
    """What a tenant pays for. Every limit is at least 1, except where 0 means "none"."""

    priority: str = "standard"
    requests_per_minute: int = 600
    input_tokens_per_minute: int = 1_000_000
    output_tokens_per_minute: int = 250_000
    max_concurrency: int = 16
    max_context_tokens: int = 8192  # prompt + output, on top of the model's own window
    max_output_tokens: int = 2048
    monthly_token_budget: int = 0  # input + output tokens per calendar month (UTC); 0 = none
    degraded_max_tokens: int = 0  # under pressure, cap max_tokens to this before refusing; 0 = off
    audit_text_hashes: bool = False  # audit events carry sha256 of the prompt and completion
    # Its prompts share no prefix affinity or engine prefix-cache entry with another tenant's
    # (a shared prefix cache lets a tenant time whether another sent a prompt: TTFT is lower).
    isolate_prefix_cache: bool = False
    # Deterministic requests repeated within the gateway's TTL are answered from the first
    # answer, free (services/gateway/response_cache.py).
    response_cache: bool = False
    # Model names the tenant may use (bare, or pinned to production/canary/previous); empty:
    # every model. See services/gateway/model_access.py.
    models: tuple[str, ...] = ()
    # Version ids the tenant may pin although no open alias names them (a withdrawn version,
    # one never promoted); admin keys need no grant.
    version_grants: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> TenantPlan:
        """Tolerates fields it does not know (a newer writer) and fills missing ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in value.items() if k in known}
        for name in LIST_FIELDS:
            if name in fields:
                fields[name] = tuple(fields[name])
        return cls(**fields)


# Seconds of a per-minute rate one bucket holds: the ratelimit's buckets and the gateways' local
# lease sizes both follow from it (services/ratelimit/limits.py says how far over a rate it lets
# a tenant get).
BURST_S = 10.0


def bucket_capacity(per_minute: float) -> float:
    """The size of the bucket that refills at `per_minute`."""
    return max(1.0, per_minute * BURST_S / 60.0)


ZERO_MEANS_NONE = ("monthly_token_budget", "degraded_max_tokens")
LIST_FIELDS = ("models", "version_grants")
BOOL_FIELDS = ("audit_text_hashes", "isolate_prefix_cache", "response_cache")
MAX_LIST_ENTRIES = 256
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # as services/registry/manifest.py
VERSION_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    name: str
    plan: TenantPlan = field(default_factory=TenantPlan)


@dataclass(frozen=True)
class ApiKey:
    """A stored key: the hash is the etcd key, so the clear key never reaches etcd."""

    key_id: str
    tenant_id: str
    role: str
    created_at: float = 0.0
    expires_at: float = 0.0  # unix seconds; 0 = never

    def expired(self, now: float) -> bool:
        return bool(self.expires_at) and now >= self.expires_at


def hash_key(clear_key: str) -> str:
    return hashlib.sha256(clear_key.encode()).hexdigest()


def parse_tenant(_suffix: str, raw: bytes) -> Tenant:
    value = etcd.decode(raw)
    return Tenant(value["tenant_id"], value["name"], TenantPlan.from_record(value["plan"]))


def parse_key(_suffix: str, raw: bytes) -> ApiKey:
    value = etcd.decode(raw)
    return ApiKey(value["key_id"], value["tenant_id"], value["role"],
                  value.get("created_at", 0.0), value.get("expires_at", 0.0))


def validate_tenant_id(tenant_id: str) -> None:
    """Before an id is looked up or echoed in an error: a client may send any string."""
    if not TENANT_ID.match(tenant_id):
        raise errors.InvalidArgument(
            "tenant_id", "must be 1-63 characters of a-z, 0-9 and '-', starting alphanumeric"
        )


def validate_tenant(tenant: Tenant) -> None:
    validate_tenant_id(tenant.tenant_id)
    if not 1 <= len(tenant.name) <= 200:
        raise errors.InvalidArgument("name", "must be 1-200 characters")
    plan = tenant.plan
    if plan.priority not in PRIORITY_CLASSES:
        raise errors.InvalidArgument("plan.priority",
                                     f"must be one of {', '.join(PRIORITY_CLASSES)}")
    for name in BOOL_FIELDS:
        if not isinstance(getattr(plan, name), bool):
            raise errors.InvalidArgument(f"plan.{name}", "must be true or false")
    for name, pattern in (("models", MODEL_NAME), ("version_grants", VERSION_ID)):
        values = getattr(plan, name)
        if not isinstance(values, (list, tuple)) or len(values) > MAX_LIST_ENTRIES:
            raise errors.InvalidArgument(f"plan.{name}", f"at most {MAX_LIST_ENTRIES} entries")
        for index, value in enumerate(values):
            if not isinstance(value, str) or not pattern.match(value):
                raise errors.InvalidArgument(
                    f"plan.{name}[{index}]", "must be a model name" if name == "models"
                    else "must be a version id, sha256:<64 hex digits>")
    for name, value in asdict(plan).items():
        if name in ("priority", *BOOL_FIELDS, *LIST_FIELDS):
            continue
        low = 0 if name in ZERO_MEANS_NONE else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 10**12:
            raise errors.InvalidArgument(f"plan.{name}", f"must be an integer in [{low}, 1e12]")
    if plan.max_output_tokens > plan.max_context_tokens:
        raise errors.InvalidArgument(
            "plan.max_output_tokens",
            f"must not exceed max_context_tokens ({plan.max_context_tokens})")
    if plan.degraded_max_tokens > plan.max_output_tokens:
        raise errors.InvalidArgument(
            "plan.degraded_max_tokens",
            f"must not exceed max_output_tokens ({plan.max_output_tokens})")


class TenantStore:
    """Writes tenants and keys (admin paths only; the hot path reads them from watch caches)."""

    def __init__(self, client: aetcd.Client):
        self._client = client

    async def put_tenant(self, tenant: Tenant) -> None:
        """Creates or replaces a tenant (the bootstrap path; admins use create/update)."""
        validate_tenant(tenant)
        await self._client.put(etcd.Keys.tenant(tenant.tenant_id).encode(), _tenant_record(tenant))

    async def create_tenant(self, tenant: Tenant) -> None:
        validate_tenant(tenant)
        key = etcd.Keys.tenant(tenant.tenant_id).encode()
        tx = self._client.transactions
        created, _ = await self._client.transaction(
            compare=[tx.version(key) == 0], success=[tx.put(key, _tenant_record(tenant))],
            failure=[],
        )
        if not created:
            raise errors.FailedPrecondition(f"tenant {tenant.tenant_id!r} already exists")

    async def get_tenant(self, tenant_id: str) -> tuple[Tenant, int]:
        """(tenant, mod revision) — the revision is what `update_tenant` compares against."""
        validate_tenant_id(tenant_id)
        got = await self._client.get(etcd.Keys.tenant(tenant_id).encode())
        if got is None:
            raise errors.NotFound(f"tenant {tenant_id!r} does not exist")
        return parse_tenant(tenant_id, got.value), got.mod_revision

    async def update_tenant(self, tenant: Tenant, expected_revision: int) -> None:
        """Replaces the tenant if nobody changed it since `expected_revision`."""
        validate_tenant(tenant)
        key = etcd.Keys.tenant(tenant.tenant_id).encode()
        tx = self._client.transactions
        ok, _ = await self._client.transaction(
            compare=[tx.mod(key) == expected_revision],
            success=[tx.put(key, _tenant_record(tenant))], failure=[],
        )
        if not ok:
            raise errors.FailedPrecondition(
                f"tenant {tenant.tenant_id!r} changed since revision {expected_revision}; "
                "reload and retry")

    async def list_tenants(self) -> list[Tenant]:
        listing = await self._client.get_prefix(etcd.Keys.tenants.encode())
        return sorted((parse_tenant("", kv.value) for kv in listing), key=lambda t: t.tenant_id)

    async def issue_key(
        self, tenant_id: str, role: str = "user", expires_at: float = 0.0
    ) -> tuple[str, ApiKey]:
        """Creates a key and returns (clear key, stored record); the clear key is not kept."""
        if role not in ROLES:
            raise errors.InvalidArgument("role", f"must be one of {', '.join(ROLES)}")
        validate_tenant_id(tenant_id)
        now = time.time()
        if not math.isfinite(expires_at) or (expires_at and expires_at <= now):
            raise errors.InvalidArgument("expires_at", "must be 0 (never) or a future time")
        if await self._client.get(etcd.Keys.tenant(tenant_id).encode()) is None:
            raise errors.NotFound(f"tenant {tenant_id!r} does not exist")
        clear = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(secrets.token_hex(6), tenant_id, role, now, expires_at)
        record = {"schema": SCHEMA, **asdict(key)}
        await self._client.put(etcd.Keys.apikey(hash_key(clear)).encode(), etcd.encode(record))
        return clear, key

    async def list_keys(self, tenant_id: str | None = None) -> list[tuple[str, ApiKey]]:
        """(hash, key) pairs, optionally of one tenant; never the clear keys (not stored)."""
        listing = await self._client.get_prefix(etcd.Keys.apikeys.encode())
        keys = [(kv.key.decode().rsplit("/", 1)[1], parse_key("", kv.value)) for kv in listing]
        return sorted(((h, k) for h, k in keys if tenant_id in (None, k.tenant_id)),
                      key=lambda pair: (pair[1].tenant_id, pair[1].created_at))

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Deletes the key; every gateway's watch drops it within milliseconds."""
        if not KEY_ID.match(key_id):
            raise errors.InvalidArgument("key_id", "must be 12 lowercase hex digits")
        for key_hash, key in await self.list_keys():
            if key.key_id == key_id:
                await self._client.delete(etcd.Keys.apikey(key_hash).encode())
                return key
        raise errors.NotFound(f"key {key_id!r} does not exist")


def _tenant_record(tenant: Tenant) -> bytes:
    return etcd.encode({"schema": SCHEMA, **asdict(tenant)})
