"""Tenants, their plans and their API keys, as stored in etcd (shared by gateway, ratelimit and
meshctl). Keys are stored by sha256 only; the clear key is shown once, when it is issued.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import aetcd

from services.common import errors, etcd

SCHEMA = 1
KEY_PREFIX = "imk_"
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ROLES = ("user", "admin")


@dataclass(frozen=True)
class TenantPlan:
    """What a tenant pays for. Zero means "no limit" only where a field says so."""

    priority: str = "standard"
    requests_per_minute: int = 600
    max_concurrency: int = 16
    max_context_tokens: int = 8192  # prompt + output, on top of the model's own window
    max_output_tokens: int = 2048


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


def hash_key(clear_key: str) -> str:
    return hashlib.sha256(clear_key.encode()).hexdigest()


def parse_tenant(_suffix: str, raw: bytes) -> Tenant:
    value = etcd.decode(raw)
    return Tenant(value["tenant_id"], value["name"], TenantPlan(**value["plan"]))


def parse_key(_suffix: str, raw: bytes) -> ApiKey:
    value = etcd.decode(raw)
    return ApiKey(value["key_id"], value["tenant_id"], value["role"])


def validate_tenant(tenant: Tenant) -> None:
    if not TENANT_ID.match(tenant.tenant_id):
        raise errors.InvalidArgument(
            "tenant_id", "must be 1-63 characters of a-z, 0-9 and '-', starting alphanumeric"
        )
    for name, value in asdict(tenant.plan).items():
        if isinstance(value, int) and value < 1:
            raise errors.InvalidArgument(f"plan.{name}", f"must be at least 1, got {value}")


class TenantStore:
    """Writes tenants and keys (admin paths only; the hot path reads them from watch caches)."""

    def __init__(self, client: aetcd.Client):
        self._client = client

    async def put_tenant(self, tenant: Tenant) -> None:
        validate_tenant(tenant)
        record: dict[str, Any] = {"schema": SCHEMA, **asdict(tenant)}
        await self._client.put(etcd.Keys.tenant(tenant.tenant_id).encode(), etcd.encode(record))

    async def issue_key(self, tenant_id: str, role: str = "user") -> tuple[str, ApiKey]:
        """Creates a key and returns (clear key, stored record); the clear key is not kept."""
        if role not in ROLES:
            raise errors.InvalidArgument("role", f"must be one of {', '.join(ROLES)}")
        if await self._client.get(etcd.Keys.tenant(tenant_id).encode()) is None:
            raise errors.NotFound(f"tenant {tenant_id!r} does not exist")
        clear = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(key_id=secrets.token_hex(6), tenant_id=tenant_id, role=role)
        record = {"schema": SCHEMA, **asdict(key)}
        await self._client.put(etcd.Keys.apikey(hash_key(clear)).encode(), etcd.encode(record))
        return clear, key
