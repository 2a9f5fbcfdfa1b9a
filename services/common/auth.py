"""Bearer-key authentication against watch-backed caches of keys and tenants (no etcd call on
the hot path). Used by the gateway for generations and by every admin API."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common import errors
from services.common.etcd import WatchCache
from services.common.tenancy import ApiKey, Tenant, TenantPlan, hash_key

BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and key behind the bearer token."""

    tenant_id: str
    key_id: str
    role: str
    plan: TenantPlan

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def prefix_salt(self) -> str:
        """What salts this caller's prompt prefix hashes and engine prefix cache: its tenant when
        its plan isolates its prefix cache (no affinity, no cached block shared with another
        tenant), else nothing (every tenant shares)."""
        return self.tenant_id if self.plan.isolate_prefix_cache else ""


class Authenticator:
    def __init__(
        self, keys: WatchCache[ApiKey], tenants: WatchCache[Tenant],
        clock: Callable[[], float] = time.time,
    ):
        self._keys = keys
        self._tenants = tenants
        self._clock = clock

    def authenticate(self, authorization: str | None) -> Principal:
        """`authorization` is the metadata value, `Bearer <key>`."""
        if not authorization:
            raise errors.Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        if not authorization.lower().startswith(BEARER):
            raise errors.Unauthenticated("the authorization metadata must be 'Bearer <api key>'")
        key = self._keys.get(hash_key(authorization[len(BEARER):].strip()))
        if key is None:
            raise errors.Unauthenticated("unknown or revoked API key")
        if key.expired(self._clock()):
            raise errors.Unauthenticated(f"API key {key.key_id} has expired")
        tenant = self._tenants.get(key.tenant_id)
        if tenant is None:
            raise errors.Unauthenticated("the API key's tenant no longer exists")
        return Principal(tenant.tenant_id, key.key_id, key.role, tenant.plan)

    def authenticate_admin(self, authorization: str | None) -> Principal:
        principal = self.authenticate(authorization)
        if not principal.is_admin:
            raise errors.PermissionDenied(f"key {principal.key_id} is not an admin key")
        return principal
