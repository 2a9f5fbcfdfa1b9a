"""The registry's etcd store against a real etcd: immutable versions, blobs required, the
compare-and-swap race, history and audit outbox written with the change, and an etcd restart in
the middle of promotes leaving a consistent state."""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import uuid

import pytest

from deploy.local.etcd_server import EtcdServer
from services.common import errors, etcd
from services.registry.blobs import LocalBlobStore
from services.registry.rollout import (
    ClearCanary,
    HistoryEntry,
    Promote,
    Rollback,
    Routing,
    SetCanary,
)
from services.registry.store import RegistryStore

pytestmark = pytest.mark.integration


def manifest(name: str, description: str = "v1") -> dict:
    return {
        "name": name, "description": description, "tokenizer": "whitespace",
        "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 1024,
                   "max_batch_size": 8},
        "sampling": {"max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "top_k": 0},
        "cost_per_1k_input_tokens": 0.1, "cost_per_1k_output_tokens": 0.2,
    }


def fresh_model() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def client(etcd_server: EtcdServer):
    async with etcd.connect(etcd_server.endpoint, 5.0) as connected:
        yield connected


@pytest.fixture
def blobs(tmp_path: pathlib.Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


async def test_versions_are_content_addressed_and_immutable(client, blobs):
    store = RegistryStore(client, blobs, source="registry/test")
    name = fresh_model()
    first, created = await store.register(manifest(name), "ops/k1")
    key = etcd.Keys.model_version(name, first.version_id).encode()
    stored = (await client.get(key)).value
    again, created_again = await store.register(manifest(name), "ops/k2")
    assert (created, created_again) == (True, False)
    assert again.version_id == first.version_id and again.registered_by == "ops/k1"
    changed, created_changed = await store.register(manifest(name, "v1 with a new description"),
                                                    "ops/k1")
    assert created_changed and changed.version_id != first.version_id
    assert (await client.get(key)).value == stored  # nothing rewrote the first version


async def test_a_manifest_needs_its_blobs_with_their_sizes(client, blobs, tmp_path):
    store = RegistryStore(client, blobs, source="registry/test")
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"w" * 5000)
    digest = blobs.put_file(weights)
    missing = "sha256:" + "0" * 64
    with_files = manifest(fresh_model())
    with_files["weights"] = [{"name": "model.bin", "digest": missing, "size_bytes": "5000"}]
    with pytest.raises(errors.FailedPrecondition) as refused:
        await store.register(with_files, "ops/k1")
    assert refused.value.field == "manifest.weights[0]"
    with_files["weights"][0].update(digest=digest, size_bytes="4999")
    with pytest.raises(errors.InvalidArgument) as wrong_size:
        await store.register(with_files, "ops/k1")
    assert wrong_size.value.field == "manifest.weights[0].size_bytes"
    with_files["weights"][0]["size_bytes"] = "5000"
    _, created = await store.register(with_files, "ops/k1")
    assert created


async def test_racing_admins_exactly_one_wins(etcd_server, client, blobs):
    name = fresh_model()
    owner = RegistryStore(client, blobs, source="registry/a")
    v1, _ = await owner.register(manifest(name, "one"), "ops/a")
    v2, _ = await owner.register(manifest(name, "two"), "ops/a")
    await owner.change_routing(name, 0, Promote(v1.version_id), "ops/a", "first")
    async with etcd.connect(etcd_server.endpoint, 5.0) as other_client:
        other = RegistryStore(other_client, blobs, source="registry/b")
        for round_ in range(8):
            revision = (await owner.routing(name)).revision
            target = v2 if (await owner.routing(name)).production == v1.version_id else v1
            outcomes = await asyncio.gather(
                owner.change_routing(name, revision, Promote(target.version_id), "ops/a",
                                     f"a{round_}"),
                other.change_routing(name, revision, SetCanary(target.version_id, 5), "ops/b",
                                     f"b{round_}"),
                return_exceptions=True,
            )
            won = [o for o in outcomes if isinstance(o, HistoryEntry)]
            lost = [o for o in outcomes if isinstance(o, errors.FailedPrecondition)]
            assert (len(won), len(lost)) == (1, 1), outcomes
            assert (await owner.routing(name)).revision == revision + 1
            if won[0].action == "canary":  # keep the next round's canary legal
                await owner.change_routing(name, revision + 1, ClearCanary(), "ops/a", "reset")


async def test_history_and_audit_events_are_written_with_the_change(client, blobs):
    store = RegistryStore(client, blobs, source="registry/test")
    name = fresh_model()
    v1, _ = await store.register(manifest(name, "one"), "ops/k1")
    v2, _ = await store.register(manifest(name, "two"), "ops/k1")
    await store.change_routing(name, 0, Promote(v1.version_id), "ops/k1", "launch")
    await store.change_routing(name, 1, Promote(v2.version_id), "ops/k2", "better answers")
    await store.change_routing(name, 2, Rollback(), "ops/k3", "TTFT regression")
    history, older = await store.history(name, 0)
    assert older == 0
    assert [(e.revision, e.action, e.actor, e.reason) for e in history] == [
        (1, "promote", "ops/k1", "launch"),
        (2, "promote", "ops/k2", "better answers"),
        (3, "rollback", "ops/k3", "TTFT regression"),
    ]
    assert history[-1].before.production == v2.version_id
    assert history[-1].after == await store.routing(name)
    assert history[-1].after.production == v1.version_id and history[-1].at > 0
    newest, older = await store.history(name, 2)
    assert ([e.revision for e in newest], older) == ([2, 3], 2)
    oldest, older = await store.history(name, 2, before_revision=older)
    assert ([e.revision for e in oldest], older) == ([1], 0)
    with pytest.raises(errors.InvalidArgument, match="before_revision"):
        await store.history(name, 2, before_revision=-1)
    for revision, action in ((1, "registry.promote"), (3, "registry.rollback")):
        event = await client.get(etcd.Keys.registry_audit_event(
            f"registry:{name}:routing:{revision}").encode())
        record = etcd.decode(event.value)
        assert (record["action"], record["target"]) == (action, name)
    with pytest.raises(errors.FailedPrecondition):  # stale revision
        await store.change_routing(name, 2, Rollback(), "ops/k1", "late")
    with pytest.raises(errors.NotFound):
        await store.change_routing(name, 3, Promote("sha256:" + "f" * 64), "ops/k1", "nope")
    with pytest.raises(errors.NotFound):
        await store.routing(fresh_model())
    with pytest.raises(errors.InvalidArgument):
        await store.change_routing(name, 3, Rollback(), "ops/k1", "")


async def test_etcd_restart_during_promotes_leaves_a_consistent_state(tmp_path, blobs):
    server = EtcdServer(tmp_path / "etcd", tmp_path / "etcd.log")
    server.start()
    try:
        async with etcd.connect(server.endpoint, 1.0) as client:
            store = RegistryStore(client, blobs, source="registry/test")
            name = fresh_model()
            v1, _ = await store.register(manifest(name, "one"), "ops/k1")
            v2, _ = await store.register(manifest(name, "two"), "ops/k1")
            await store.change_routing(name, 0, Promote(v1.version_id), "ops/k1", "launch")
            outcomes: list[str] = []

            async def promote_forever() -> None:
                for attempt in range(400):
                    try:
                        routing = await store.routing(name)
                        target = v2 if routing.production == v1.version_id else v1
                        await store.change_routing(name, routing.revision,
                                                   Promote(target.version_id), "ops/k1",
                                                   f"flip {attempt}")
                        outcomes.append("ok")
                    except (errors.Unavailable, errors.FailedPrecondition) as exc:
                        outcomes.append(exc.code)
                        await asyncio.sleep(0.05)
                    if outcomes.count("UNAVAILABLE") and outcomes[-3:] == ["ok"] * 3:
                        return

            flipping = asyncio.create_task(promote_forever())
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
            async with asyncio.timeout(60):
                await flipping
            assert "UNAVAILABLE" in outcomes and outcomes[-1] == "ok"
            routing = await store.routing(name)
            history, _ = await store.history(name, 10_000)
            # Every committed change has exactly its history entry and its audit event, and the
            # routing is the last entry's result: nothing half-written.
            assert [e.revision for e in history] == list(range(1, routing.revision + 1))
            assert history[-1].after == routing
            for earlier, later in itertools.pairwise(history):
                assert later.before == earlier.after
            outbox = await client.get_prefix(etcd.Keys.registry_audit_outbox.encode())
            revisions = sorted(int(kv.key.decode().rsplit(":", 1)[1]) for kv in outbox
                               if f":{name}:routing:" in kv.key.decode())
            assert revisions == list(range(1, routing.revision + 1))
            assert routing.production in (v1.version_id, v2.version_id)
            assert Routing.from_record(routing.to_record()) == routing
    finally:
        server.stop()

