"""Which Triton models some replica serves now, from the replica records in etcd: what lets the
rollout send traffic only to versions that are loaded (`ModelCatalog.route`), and the replicas
the gateway routes to by itself when no scheduler answers (`fallback.py`)."""

from __future__ import annotations

import aetcd

from services.common import etcd
from services.common.records import ReplicaRecord

__all__ = ["ServedModels"]


class ServedModels:
    """A watch of `replicas/`; `served(model)` is one set lookup, rebuilt on every change."""

    def __init__(self, client: aetcd.Client):
        self._served: frozenset[str] = frozenset()
        self._records: etcd.WatchCache[ReplicaRecord] = etcd.WatchCache(
            client, etcd.Keys.replicas,
            lambda _suffix, raw: ReplicaRecord.decode(etcd.decode(raw)),
            on_change=self._rebuild)

    def _rebuild(self) -> None:
        self._served = frozenset(
            model for record in self._records.items.values()
            if record.healthy and not record.draining for model in record.models)

    def served(self, model: str) -> bool:
        return model in self._served

    def records(self) -> list[ReplicaRecord]:
        """Every replica record as last seen (healthy or not)."""
        return list(self._records.items.values())

    async def start(self) -> None:
        await self._records.start()

    async def stop(self) -> None:
        await self._records.stop()
