"""Bearer-key authentication against watch-backed caches of keys and tenants (no etcd call)."""

from __future__ import annotations

from services.common import errors
from services.common.etcd import WatchCache
from services.common.tenancy import ApiKey, Tenant, hash_key
from services.gateway.requests import Principal

BEARER = "bearer "


class Authenticator:
    def __init__(self, keys: WatchCache[ApiKey], tenants: WatchCache[Tenant]):
        self._keys = keys
        self._tenants = tenants

    def authenticate(self, authorization: str | None) -> Principal:
        """`authorization` is the metadata value, `Bearer <key>`."""
        if not authorization:
            raise errors.Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        if not authorization.lower().startswith(BEARER):
            raise errors.Unauthenticated("the authorization metadata must be 'Bearer <api key>'")
        key = self._keys.get(hash_key(authorization[len(BEARER):].strip()))
        if key is None:
            raise errors.Unauthenticated("unknown or revoked API key")
        tenant = self._tenants.get(key.tenant_id)
        if tenant is None:
            raise errors.Unauthenticated("the API key's tenant no longer exists")
        return Principal(tenant.tenant_id, key.key_id, key.role, tenant.plan)
