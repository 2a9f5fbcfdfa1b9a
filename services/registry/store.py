"""The registry's write side in etcd: immutable versions, compare-and-swap routing, history.

    models/<name>/versions/<version id>  {"schema", "version_id", "manifest", "registered_at",
                                          "registered_by"}       created once, never changed
    models/<name>/routing                `rollout.Routing` as JSON (with "schema")
    models/<name>/history/<revision>     `rollout.HistoryEntry` as JSON
    registry/audit-outbox/<event id>     an admin audit event not yet acknowledged by the auditor

A routing change writes routing, its history entry and its audit event in one transaction that
compares the routing key's mod revision with what was read, so two racing admins cannot both
win, and an etcd failure in the middle leaves either all three or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import aetcd.exceptions
import grpc

from services.common import errors, etcd
from services.common.logs import get_logger
from services.registry.blobs import BlobStore, Collected
from services.registry.manifest import FILE_GROUPS, MODEL_NAME, ModelVersion, validate_manifest
from services.registry.manifest import version_id as compute_version_id
from services.registry.rollout import (
    Change,
    HistoryEntry,
    Routing,
    action_name,
    apply_change,
    validate_reason,
)

SCHEMA = 1
ROUTING_SCHEMA = 2
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 10_000
MIN_GC_GRACE_S = 3600.0  # longer than any push takes between its uploads and its registration
MAX_GC_GRACE_S = 365 * 86400.0
AUDITED_DIGESTS = 100  # an audit event names at most this many deleted blobs (and the count)
log = get_logger(__name__)


@contextlib.asynccontextmanager
async def etcd_unavailable_as_error() -> AsyncIterator[None]:
    """etcd away or too slow → Unavailable (safe to retry: the writes are transactions)."""
    try:
        yield
    except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, TimeoutError) as exc:
        raise errors.Unavailable(f"etcd is unavailable: {exc!r}", retry_after_s=1.0) from exc


def check_model_name(model: str) -> str:
    if not MODEL_NAME.match(model):
        raise errors.InvalidArgument(
            "model", "must be 1-64 characters of a-z, 0-9, '.', '_' and '-'"
        )
    return model


def audit_record(
    event_id: str, actor: str, action: str, target: str, before: Any, after: Any, reason: str,
    source: str, at: float,
) -> dict[str, Any]:
    """The outbox form of an `AdminRecord` audit event (see `admin_audit.py`)."""
    return {
        "schema": SCHEMA, "event_id": event_id, "time": at, "source": source, "actor": actor,
        "action": action, "target": target, "reason": reason,
        "before_json": json.dumps(before, sort_keys=True),
        "after_json": json.dumps(after, sort_keys=True),
    }


def _stored_version(record: dict[str, Any]) -> ModelVersion:
    return ModelVersion(record["version_id"], record["manifest"], record["registered_at"],
                        record.get("registered_by", ""))


class RegistryStore:
    """Every write of the registry; `source` names this instance in audit events."""

    def __init__(self, client: aetcd.Client, blobs: BlobStore, source: str,
                 clock=time.time):
        self._client = client
        self._blobs = blobs
        self._source = source
        self._clock = clock

    async def register(self, manifest: dict[str, Any], actor: str) -> tuple[ModelVersion, bool]:
        """Stores the version unless it exists (create-if-absent). Returns (version, created).

        Every file it pins must already be in the blob store with the stated size."""
        validate_manifest(manifest)
        await asyncio.to_thread(self._check_blobs, manifest)
        vid = compute_version_id(manifest)
        name = manifest["name"]
        key = etcd.Keys.model_version(name, vid).encode()
        now = self._clock()
        record = {"schema": SCHEMA, "version_id": vid, "manifest": manifest,
                  "registered_at": now, "registered_by": actor}
        event_id = f"registry:{name}:register:{vid}"
        audit = audit_record(event_id, actor, "registry.register_version", f"{name}@{vid}",
                             None, {"version_id": vid}, "", self._source, now)
        tx = self._client.transactions
        async with etcd_unavailable_as_error():
            created, _ = await self._client.transaction(
                compare=[tx.version(key) == 0],
                success=[tx.put(key, etcd.encode(record)),
                         tx.put(etcd.Keys.registry_audit_event(event_id).encode(),
                                etcd.encode(audit))],
                failure=[],
            )
            if created:
                return ModelVersion(vid, manifest, now, actor), True
            existing = await self._client.get(key)
        return _stored_version(etcd.decode(existing.value)), False

    def _check_blobs(self, manifest: dict[str, Any]) -> None:
        for group in FILE_GROUPS:
            for index, ref in enumerate(manifest.get(group, [])):
                field = f"manifest.{group}[{index}]"
                if not self._blobs.touch(ref["digest"]):  # also spares it from collection
                    raise errors.FailedPrecondition(
                        f"{field}: blob {ref['digest']} ({ref['name']}) is not in the blob store; "
                        "upload it first (meshctl registry push uploads what is missing)",
                        field=field,
                    )
                stored = self._blobs.uploaded_size(ref["digest"])
                if stored != int(ref["size_bytes"]):
                    raise errors.InvalidArgument(
                        f"{field}.size_bytes",
                        f"the blob {ref['digest']} has {stored} bytes, not {ref['size_bytes']}",
                    )

    async def collect_garbage(
        self, grace_s: float, dry_run: bool, actor: str, reason: str
    ) -> Collected:
        """Deletes the blobs no registered version pins, and abandoned uploads, older than
        `grace_s` (uploads of a push still running are younger); audited unless a dry run."""
        if not MIN_GC_GRACE_S <= grace_s <= MAX_GC_GRACE_S:
            raise errors.InvalidArgument(
                "grace", f"must be {MIN_GC_GRACE_S:.0f}-{MAX_GC_GRACE_S:.0f} seconds")
        if not dry_run:
            validate_reason(reason)
        started = self._clock()
        async with etcd_unavailable_as_error():
            listing = await self._client.get_prefix(etcd.Keys.models.encode())
        pinned = {
            ref["digest"]
            for kv in listing if b"/versions/" in kv.key
            for group in FILE_GROUPS for ref in etcd.decode(kv.value)["manifest"].get(group, [])
        }
        collected = await asyncio.to_thread(
            self._blobs.collect, pinned.__contains__, started - grace_s, dry_run)
        if not dry_run and (collected.deleted or collected.abandoned_uploads):
            event_id = f"registry:gc:{uuid.uuid4().hex}"
            audit = audit_record(
                event_id, actor, "registry.collect_garbage", "blobs", None,
                {"deleted": collected.deleted[:AUDITED_DIGESTS],
                 "deleted_count": len(collected.deleted), "freed_bytes": collected.freed_bytes,
                 "abandoned_uploads": collected.abandoned_uploads}, reason, self._source, started)
            async with etcd_unavailable_as_error():
                await self._client.put(etcd.Keys.registry_audit_event(event_id).encode(),
                                       etcd.encode(audit))
        log.info("blobs_collected", dry_run=dry_run, deleted=len(collected.deleted),
                 freed_bytes=collected.freed_bytes, abandoned_uploads=collected.abandoned_uploads,
                 kept=collected.kept, actor=actor)
        return collected

    async def version(self, model: str, version_id: str) -> ModelVersion | None:
        async with etcd_unavailable_as_error():
            found = await self._client.get(etcd.Keys.model_version(model, version_id).encode())
        return None if found is None else _stored_version(etcd.decode(found.value))

    async def versions(self, model: str) -> list[ModelVersion]:
        """Every version of `model`, oldest first; NotFound when it has none."""
        check_model_name(model)
        async with etcd_unavailable_as_error():
            listing = await self._client.get_prefix(
                etcd.Keys.model_versions_prefix(model).encode())
        versions = [_stored_version(etcd.decode(kv.value)) for kv in listing]
        if not versions:
            raise errors.NotFound(f"model {model!r} does not exist")
        return sorted(versions, key=lambda v: (v.registered_at, v.version_id))

    async def routing(self, model: str) -> Routing:
        """The model's routing as etcd has it now (what a compare-and-swap compares with)."""
        check_model_name(model)
        async with etcd_unavailable_as_error():
            current = await self._client.get(etcd.Keys.model_routing(model).encode())
            if current is not None:
                return Routing.from_record(etcd.decode(current.value))
            versions = await self._client.get_prefix(
                etcd.Keys.model_versions_prefix(model).encode(), keys_only=True
            )
        if not list(versions):
            raise errors.NotFound(f"model {model!r} does not exist")
        return Routing()

    async def change_routing(
        self, model: str, expected_revision: int, change: Change, actor: str, reason: str
    ) -> HistoryEntry:
        """Applies `change` if the routing is still at `expected_revision`; FailedPrecondition
        when someone else changed it first (reload and retry)."""
        check_model_name(model)
        validate_reason(reason)
        routing_key = etcd.Keys.model_routing(model).encode()
        async with etcd_unavailable_as_error():
            current = await self._client.get(routing_key)
        before = Routing.from_record(etcd.decode(current.value)) if current else Routing()
        if before.revision != expected_revision:
            raise errors.FailedPrecondition(
                f"{model}'s routing is at revision {before.revision}, not {expected_revision}: "
                "someone changed it since you looked; check `meshctl registry history` and retry"
            )
        target = getattr(change, "version_id", "")
        if target and await self.version(model, target) is None:
            raise errors.NotFound(f"model {model!r} has no version {target}")
        if current is None and not target:
            await self.routing(model)  # NotFound for an unknown model, before the state rules
        now = self._clock()
        after = apply_change(before, change, model, actor, now)
        action = action_name(change)
        entry = HistoryEntry(after.revision, action, actor, reason, now, before, after)
        event_id = f"registry:{model}:routing:{after.revision}"
        audit = audit_record(event_id, actor, f"registry.{action}", model, before.to_record(),
                             after.to_record(), reason, self._source, now)
        tx = self._client.transactions
        guard = (tx.mod(routing_key) == current.mod_revision if current
                 else tx.version(routing_key) == 0)
        async with etcd_unavailable_as_error():
            won, _ = await self._client.transaction(
                compare=[guard],
                success=[
                    tx.put(routing_key,
                           etcd.encode({"schema": ROUTING_SCHEMA, **after.to_record()})),
                    tx.put(etcd.Keys.model_history(model, after.revision).encode(),
                           etcd.encode({"schema": SCHEMA, **entry.to_record()})),
                    tx.put(etcd.Keys.registry_audit_event(event_id).encode(),
                           etcd.encode(audit)),
                ],
                failure=[],
            )
        if not won:
            raise errors.FailedPrecondition(
                f"{model}'s routing changed while this change was being written; someone else "
                "won the race. Check `meshctl registry history` and retry"
            )
        log.info("routing_changed", model=model, action=action, revision=after.revision,
                 actor=actor, production=after.production, canary=after.canary,
                 shadow=after.shadow)
        return entry

    async def history(
        self, model: str, limit: int, before_revision: int = 0
    ) -> tuple[list[HistoryEntry], int]:
        """One page: the newest `limit` changes (0: the default) older than `before_revision`
        (0: up to the newest), oldest first, and the next older page's `before_revision` (0:
        none). Every change adds one to the revision, so a page is one key range of `limit`
        keys: a long history costs nothing to page through."""
        check_model_name(model)
        limit = limit or DEFAULT_HISTORY_LIMIT
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise errors.InvalidArgument("limit", f"must be 0..{MAX_HISTORY_LIMIT}")
        if before_revision < 0:
            raise errors.InvalidArgument("before_revision", "must be 0 (the newest) or more")
        end = before_revision or (await self.routing(model)).revision + 1
        start = max(1, end - limit)
        async with etcd_unavailable_as_error():
            listing = await self._client.get_range(
                etcd.Keys.model_history(model, start).encode(),
                etcd.Keys.model_history(model, end).encode(),
            ) if start < end else []
        entries = [HistoryEntry.from_record(etcd.decode(kv.value)) for kv in listing]
        return entries, start if start > 1 else 0
