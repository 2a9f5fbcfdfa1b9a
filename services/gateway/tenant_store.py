"""A per-tenant bounded store: the bookkeeping the idempotency cache and the response cache share.

Entries are keyed by (tenant, key), kept in insertion order per tenant and by age overall, and
expire `ttl_s` after they were put. Memory is bounded three ways: at most
`max_entries_per_tenant` entries and `max_tenant_bytes` per tenant (past either, that tenant's
own oldest entry goes) and `max_bytes` in all (past it, the oldest evictable entry of the tenant
holding the most goes — the growing tenant's own when it ties for the most). So past `max_bytes`
the largest tenant loses entries even under its own caps (max-min fair shares): a tenant holding
at most `max_bytes / T` (T tenants holding entries) is never evicted by another's pressure, and
no tenant ever is only when `max_bytes >= T × max_tenant_bytes`. An entry the caller's
`evictable` refuses (a generation still running) is never taken for `max_bytes` — the next
largest tenant gives way instead, and with nothing evictable left the total stays over until
such entries finish — but its own tenant's caps still evict it. Sizes are whatever the caller
estimates; the store only adds them up.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["TenantBoundedStore"]

V = TypeVar("V")


@dataclass
class _Held(Generic[V]):
    tenant: str
    key: str
    value: V
    stored: float
    size: int  # estimated bytes, counted in the store's totals


class TenantBoundedStore(Generic[V]):
    def __init__(self, ttl_s: float, max_entries_per_tenant: int, max_tenant_bytes: int,
                 max_bytes: int, clock: Callable[[], float] = time.monotonic,
                 evictable: Callable[[V], bool] = lambda value: True):
        self._ttl_s = ttl_s
        self._max_entries_per_tenant = max_entries_per_tenant
        self._max_tenant_bytes = max_tenant_bytes
        self._max_bytes = max_bytes
        self._clock = clock
        self._evictable = evictable
        self._by_age: collections.OrderedDict[tuple[str, str], _Held[V]] = (
            collections.OrderedDict())
        self._tenants: dict[str, collections.OrderedDict[str, _Held[V]]] = {}
        self._tenant_bytes: collections.Counter[str] = collections.Counter()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Estimated bytes held, all tenants together."""
        return self._bytes

    def entries(self, tenant: str) -> int:
        return len(self._tenants.get(tenant, ()))

    def get(self, tenant: str, key: str) -> V | None:
        """The tenant's live value under `key`, after dropping what has expired."""
        self._expire()
        held = self._tenants.get(tenant, {}).get(key)
        return held.value if held is not None else None

    def put(self, tenant: str, key: str, value: V, size: int) -> None:
        """Holds `value` (replacing the tenant's entry under `key`), then evicts until every
        bound holds — which may evict `value` itself when it alone is past the tenant's share."""
        self._expire()
        old = self._tenants.get(tenant, {}).get(key)
        if old is not None:
            self._evict(old)
        held = _Held(tenant, key, value, self._clock(), 0)
        self._by_age[(tenant, key)] = held
        self._tenants.setdefault(tenant, collections.OrderedDict())[key] = held
        self._grow(held, size)

    def grow(self, tenant: str, key: str, value: V, size: int) -> None:
        """Counts `size` more bytes for `value` if it is still held, then evicts until every
        bound holds; an evicted value is no longer counted."""
        held = self._held(tenant, key, value)
        if held is not None:
            self._grow(held, size)

    def remove(self, tenant: str, key: str, value: V) -> None:
        """Forgets `value` if it is still the one held under `key`."""
        held = self._held(tenant, key, value)
        if held is not None:
            self._evict(held)

    def _held(self, tenant: str, key: str, value: V) -> _Held[V] | None:
        held = self._tenants.get(tenant, {}).get(key)
        return held if held is not None and held.value is value else None

    def _grow(self, held: _Held[V], size: int) -> None:
        held.size += size
        tenant = held.tenant
        self._tenant_bytes[tenant] += size
        self._bytes += size
        while (len(self._tenants.get(tenant, ())) > self._max_entries_per_tenant
               or self._tenant_bytes[tenant] > self._max_tenant_bytes):
            self._evict(next(iter(self._tenants[tenant].values())))
        while self._bytes > self._max_bytes:
            victim = self._pressed(tenant)
            if victim is None:  # only unevictable entries: over until they finish
                return
            self._evict(victim)

    def _pressed(self, growing: str) -> _Held[V] | None:
        """The oldest evictable entry of the tenant holding the most (`growing` on a tie), or
        of the next largest when that tenant has none."""
        def share(t: str) -> tuple[int, bool]:
            return self._tenant_bytes[t], t == growing

        largest = max(self._tenants, key=share)  # O(T); the sort only when it has none
        for tenant in (largest, *sorted(self._tenants, key=share, reverse=True)):
            for held in self._tenants[tenant].values():
                if self._evictable(held.value):
                    return held
        return None

    def _evict(self, held: _Held[V]) -> None:
        tenant_entries = self._tenants[held.tenant]
        del tenant_entries[held.key]
        del self._by_age[(held.tenant, held.key)]
        self._tenant_bytes[held.tenant] -= held.size
        self._bytes -= held.size
        if not tenant_entries:
            del self._tenants[held.tenant]
            del self._tenant_bytes[held.tenant]

    def _expire(self) -> None:
        horizon = self._clock() - self._ttl_s
        while self._by_age:
            held = next(iter(self._by_age.values()))
            if held.stored > horizon:
                return
            self._evict(held)
