"""The Python SDK's admin surface against the real stack, through the SDK only (the versions are
pushed with meshctl): tenants and keys on the gateway, versions and rollouts on the registry,
audit queries on the auditor, with the client's typed errors and retries."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from infermesh_client import (
    NO_RETRIES,
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    LocalBlob,
    NotFound,
    PermissionDenied,
    PlanChange,
    RateLimited,
    Unauthenticated,
)

from deploy.local.stack import StackInfo
from tests.e2e.test_python_sdk import CallCounter
from tests.e2e.test_registry_rollouts import manifest, meshctl, ok, pushed_version

pytestmark = [pytest.mark.integration, pytest.mark.operator]  # the registry and auditor


def admin_client(stack: StackInfo, key: str | None = None, **options) -> AsyncClient:
    return AsyncClient(stack.gateway, key or stack.api_key,
                       registry_target=stack.endpoints["registry"],
                       auditor_target=stack.endpoints["auditor"], **options)


async def wait_until_unauthenticated_is(client: AsyncClient, expected: bool) -> None:
    """Gateways see keys through a watch: a new key works, a revoked one stops, within 5 s."""
    deadline = time.monotonic() + 5
    while True:
        try:
            await client.models()
            refused = False
        except Unauthenticated:
            refused = True
        if refused == expected:
            return
        assert time.monotonic() < deadline, f"the key is still {'not ' * expected}refused"
        await asyncio.sleep(0.05)


def test_tenants_and_keys(stack: StackInfo):
    tenant_id = f"sdk-{uuid.uuid4().hex[:8]}"
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    with Client(stack.gateway, stack.api_key) as client:
        created = client.admin.tenants.create(tenant_id, name="SDK test", plan=PlanChange(
            priority="standard", requests_per_minute=120, models=("only-this-model",)))
        updated = client.admin.tenants.update(
            tenant_id, plan=PlanChange(requests_per_minute=240, models=()),
            expected_revision=created.revision)
        with pytest.raises(FailedPrecondition):  # the tenant changed since `created`
            client.admin.tenants.update(tenant_id, plan=PlanChange(max_concurrency=1),
                                        expected_revision=created.revision)
        listed = {t.tenant_id: t for t in client.admin.tenants.list()}
        read = client.admin.tenants.get(tenant_id)
        with pytest.raises(NotFound):
            client.admin.tenants.get(f"{tenant_id}-missing")
        issued = client.admin.keys.issue(tenant_id, expires_at=expires)
        keys = client.admin.keys.list(tenant_id)
    assert (created.name, created.plan.priority, created.plan.requests_per_minute,
            created.plan.models) == ("SDK test", "standard", 120, ("only-this-model",))
    assert (updated.plan.requests_per_minute, updated.plan.models, updated.plan.priority) == (
        240, (), "standard")
    assert updated.revision > created.revision
    assert read.plan == listed[tenant_id].plan == updated.plan and read.revision == updated.revision
    assert issued.api_key and (issued.key.tenant_id, issued.key.role) == (tenant_id, "user")
    assert issued.key.expires_at == expires and issued.key.created_at is not None
    assert [k.key_id for k in keys] == [issued.key.key_id]

    async def use_then_revoke() -> None:
        async with admin_client(stack, issued.api_key) as user, admin_client(stack) as admin:
            await wait_until_unauthenticated_is(user, False)
            with pytest.raises(PermissionDenied):
                await user.admin.tenants.list()
            revoked = await admin.admin.keys.revoke(issued.key.key_id)
            assert revoked.key_id == issued.key.key_id
            await wait_until_unauthenticated_is(user, True)

    asyncio.run(use_then_revoke())


def push_versions(stack: StackInfo, tmp_path) -> tuple[str, str, str]:
    """A new model with two versions, neither serving yet: (model, v1, v2)."""
    name = f"sdk-admin-{uuid.uuid4().hex[:6]}"
    ids = []
    for label in ("v1", "v2"):
        directory = tmp_path / label
        directory.mkdir()
        (directory / "engine.plan").write_bytes(os.urandom(100_000))
        (directory / "manifest.json").write_text(json.dumps(manifest(name, f"{name} {label}")))
        ids.append(pushed_version(ok(meshctl(stack, "push", str(directory)))))
    return name, ids[0], ids[1]


async def test_registry_versions_and_rollouts(stack: StackInfo, tmp_path):
    model, v1, v2 = push_versions(stack, tmp_path)
    async with admin_client(stack) as client:
        versions = await client.registry.versions(model)
        by_prefix = await client.registry.version(f"{model}@{v2[len('sha256:'):][:10]}")
        promoted = await client.registry.promote(model, v1, reason="launch")
        second = await client.registry.promote(model, v2[:20], reason="v2 is better")
        canary = await client.registry.canary(model, "previous", 10, reason="a tenth back on v1")
        cleared = await client.registry.clear_canary(model, reason="enough")
        back = await client.registry.rollback(model, reason="v2 answers worse")
        with pytest.raises(FailedPrecondition):  # compare-and-swap on a revision long gone
            await client.registry.rollback(model, reason="stale",
                                           expected_revision=promoted.routing.revision)
        with pytest.raises(InvalidArgument) as short:
            await client.registry.promote(model, "abc", reason="too short a prefix")
        with pytest.raises(NotFound):
            await client.registry.version("no-such-model")
        history = await client.registry.history(model)
        older = await client.registry.history(model, limit=2)
        registered = {m.name: m for m in await client.registry.models()}
        routing = await client.registry.routing(model)
    assert [v.version_id for v in versions] == [v1, v2]
    assert versions[0].manifest["description"] == f"{model} v1" == versions[0].description
    assert versions[0].triton_model_name.startswith(model) and versions[0].registered_at
    assert by_prefix.version_id == v2
    assert (promoted.routing.production, promoted.entry.action) == (v1, "promote")
    assert (second.routing.production, second.routing.previous) == (v2, v1)
    assert (canary.routing.canary, canary.routing.canary_weight_percent) == (v1, 10)
    assert cleared.routing.canary == "" and cleared.entry.before.canary == v1
    assert (back.routing.production, back.routing.previous) == (v1, v2)
    assert back.entry.reason == "v2 answers worse" and back.entry.actor
    assert short.value.field == "version"
    assert [e.action for e in history.entries] == [
        "promote", "promote", "canary", "clear_canary", "rollback"]
    assert [e.revision for e in older.entries] == [e.revision for e in history.entries[-2:]]
    assert older.next_before_revision == history.entries[-2].revision
    assert registered[model].version_count == 2 and registered[model].routing == routing
    assert routing == back.routing

    async with admin_client(stack, await _user_key(stack)) as user:
        assert [v.version_id for v in await user.registry.versions(model)] == [v1, v2]
        with pytest.raises(PermissionDenied):
            await user.registry.rollback(model, reason="not mine to change")


async def _user_key(stack: StackInfo) -> str:
    async with admin_client(stack) as admin:
        tenant = await admin.admin.tenants.create(f"sdk-{uuid.uuid4().hex[:8]}")
        issued = await admin.admin.keys.issue(tenant.tenant_id)
    async with admin_client(stack, issued.api_key) as user:
        await wait_until_unauthenticated_is(user, False)
    return issued.api_key


async def test_push_uploads_only_what_is_missing_and_gc_dry_runs(stack: StackInfo, tmp_path):
    """The SDK's push (what `meshctl registry push` runs): a file's bytes go up once, then are
    found present; the same manifest again is the same version; a dry-run collection deletes
    nothing."""
    name = f"sdk-push-{uuid.uuid4().hex[:6]}"
    weights = tmp_path / "engine.plan"
    size = 2_500_000  # three chunks of at most 1 MiB
    weights.write_bytes(os.urandom(size))
    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    pinned = {**manifest(name, "pushed by the SDK"),
              "weights": [{"name": "engine.plan", "digest": digest, "size_bytes": size}]}
    sent: list[int] = []
    async with admin_client(stack) as client:
        first = await client.registry.push(pinned, [LocalBlob(str(weights), digest, size)],
                                           progress=sent.append)
        again = await client.registry.push(pinned, [LocalBlob(str(weights), digest, size)])
        shown = await client.registry.version(f"{name}@{first.version_id}")
        with pytest.raises(InvalidArgument) as refused:  # checked before any byte is sent
            await client.registry.push({"no_such_field": 1})
        collected = await client.registry.collect_garbage(dry_run=True, grace_seconds=3600)
    assert sum(sent) == size and len(sent) == 3  # in chunks, counted once
    assert first.created and not again.created and again.version_id == first.version_id
    assert shown.manifest["weights"][0]["digest"] == digest
    assert refused.value.field == "manifest"
    assert digest not in collected.deleted and collected.to_dict()["kept"] == collected.kept


async def test_audit_queries_and_their_retries(stack: StackInfo):
    request_id = f"sdk-audit-{uuid.uuid4().hex[:8]}"
    since = datetime.now(UTC) - timedelta(seconds=5)
    async with admin_client(stack) as client:
        done = await client.generate(stack.reference_model, "audit me", max_tokens=3,
                                     request_id=request_id)
        deadline = time.monotonic() + 15  # the gateway ships audit events in batches
        while not (records := await client.audit.query(request_id=request_id, since=since)):
            assert time.monotonic() < deadline, "the generation never reached the audit log"
            await asyncio.sleep(0.2)
    [record] = records
    assert record.request_id == request_id and record.admin is None
    assert record.generation is not None
    assert (record.generation.model_version, record.generation.completion_tokens,
            record.generation.finish_reason) == (done.model_version, 3, "length")
    assert json.loads(record.line)["seq"] == record.sequence
    assert record.appended is not None and record.appended >= since

    # The auditor runs two reads per tenant at once and refuses more with a retry delay:
    # without retries some of 12 concurrent queries are refused; with them, all are answered.
    # Each reads from `since` only: a scan of the whole shared log (every e2e test's events) can
    # outlast the retries' budget.
    async with admin_client(stack, retry=NO_RETRIES) as impatient:
        outcomes = await asyncio.gather(
            *(impatient.audit.query(request_id=request_id, since=since) for _ in range(12)),
            return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert refused and all(r.reason == "audit_reads" and r.retry_after for r in refused)
    assert all(isinstance(o, (list, RateLimited)) for o in outcomes), outcomes
    counter = CallCounter()
    async with admin_client(stack, interceptors=counter.interceptors) as patient:
        answered = await asyncio.gather(
            *(patient.audit.query(request_id=request_id, since=since) for _ in range(12)))
    assert all(found == records for found in answered)
    assert counter.calls["Query"] > 12
