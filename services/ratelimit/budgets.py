"""Durable monthly token budgets: month-to-date usage per tenant, kept in etcd.

    budgets/<YYYY-MM>/<tenant>   {"schema": 1, "used": <tokens>}

Usage reported by gateways is added in memory and written out every flush interval (and on
shutdown), so a crash loses at most one interval of reports — under-counting by that much, never
double-counting. A new month starts from zero under its own key.
"""

from __future__ import annotations

import time

import aetcd

from services.common import etcd


def current_month(now: float | None = None) -> str:
    return time.strftime("%Y-%m", time.gmtime(time.time() if now is None else now))


class BudgetStore:
    def __init__(self, client: aetcd.Client):
        self._client = client
        self._written: dict[tuple[str, str], int] = {}

    async def load(self, month: str, tenant: str) -> int:
        got = await self._client.get(etcd.Keys.budget(month, tenant).encode())
        used = int(etcd.decode(got.value)["used"]) if got else 0
        self._written[(month, tenant)] = used
        return used

    async def flush(self, month: str, usage: dict[str, int]) -> int:
        """Writes the tenants whose usage changed since the last write; returns how many."""
        changed = {t: u for t, u in usage.items() if self._written.get((month, t)) != u}
        for tenant, used in changed.items():
            await self._client.put(etcd.Keys.budget(month, tenant).encode(),
                                   etcd.encode({"schema": 1, "used": used}))
            self._written[(month, tenant)] = used
        return len(changed)
