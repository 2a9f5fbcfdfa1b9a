"""The registry's write side in etcd: immutable versions, compare-and-swap aliases, history.

    models/<name>/versions/<version id>  {"schema", "version_id", "manifest", "registered_at"}
    models/<name>/routing                {"schema", "aliases": {"production": id, "previous": id}}
    models/<name>/history/<revision>     {"schema", "alias", "from", "to", "actor", "reason", "at"}
"""

from __future__ import annotations

import time
from typing import Any

import aetcd

from services.common import errors, etcd
from services.registry.catalog import ModelCatalog
from services.registry.manifest import ALIAS, ModelVersion, validate_manifest, version_id

SCHEMA = 1


def parse_models_key(_suffix: str, raw: bytes) -> dict[str, Any]:
    return etcd.decode(raw)


class RegistryStore:
    def __init__(self, client: aetcd.Client, catalog: ModelCatalog):
        self._client = client
        self._catalog = catalog

    async def register(self, manifest: dict[str, Any]) -> tuple[ModelVersion, bool]:
        """Stores the version unless it exists (create-if-absent). Returns (version, created)."""
        validate_manifest(manifest)
        vid = version_id(manifest)
        key = etcd.Keys.model_version(manifest["name"], vid).encode()
        record = {"schema": SCHEMA, "version_id": vid, "manifest": manifest,
                  "registered_at": time.time()}
        tx = self._client.transactions
        created, _ = await self._client.transaction(
            compare=[tx.version(key) == 0], success=[tx.put(key, etcd.encode(record))], failure=[]
        )
        return ModelVersion(vid, manifest), bool(created)

    async def set_alias(
        self, model: str, alias: str, target: str, expected: str, actor: str, reason: str
    ) -> str:
        """Moves `alias` to `target` if it still points at `expected`; returns the old target.

        Moving `production` also records the old target as `previous`, for rollback.
        """
        if not ALIAS.match(alias) or alias == "previous":
            raise errors.InvalidArgument("alias", "must be a-z, 0-9, '-' (and not 'previous')")
        version_key = etcd.Keys.model_version(model, target).encode()
        if await self._client.get(version_key) is None:
            raise errors.NotFound(f"model {model!r} has no version {target}")
        routing_key = etcd.Keys.model_routing(model).encode()
        current = await self._client.get(routing_key)
        aliases: dict[str, str] = etcd.decode(current.value)["aliases"] if current else {}
        before = aliases.get(alias, "")
        if before != expected:
            raise errors.FailedPrecondition(
                f"{model}@{alias} points at {before or 'nothing'}, not {expected or 'nothing'}; "
                "reload and retry"
            )
        updated = dict(aliases, **{alias: target})
        if alias == "production" and before and before != target:
            updated["previous"] = before
        tx = self._client.transactions
        guard = tx.mod(routing_key) == current.mod_revision if current else tx.version(routing_key) == 0
        history = {"schema": SCHEMA, "alias": alias, "from": before, "to": target,
                   "actor": actor, "reason": reason, "at": time.time()}
        ok, _ = await self._client.transaction(
            compare=[guard],
            success=[
                tx.put(routing_key, etcd.encode({"schema": SCHEMA, "aliases": updated})),
                tx.put(etcd.Keys.model_history(model, time.time_ns()).encode(), etcd.encode(history)),
            ],
            failure=[],
        )
        if not ok:
            raise errors.FailedPrecondition(
                f"{model}@{alias} changed while we were moving it; reload and retry"
            )
        return before
