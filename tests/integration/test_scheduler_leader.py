"""Leader election and the placement leader against a real etcd: one leader of two, takeover
within the TTL when the leader's lease is revoked or it closes, a deposed leader's fenced write
refused, and placements written for replicas from the registry's routing and the demand."""

from __future__ import annotations

import asyncio
import time
import uuid

import aetcd.exceptions
import pytest
from prometheus_client import REGISTRY

from deploy.local.etcd_server import EtcdServer
from services.common import etcd
from services.common.records import PlacementRecord
from services.common.runtime import ServiceContext
from services.common.settings import ServiceSettings
from services.registry.manifest import served_model_name
from services.scheduler import placement_loop
from services.scheduler.leader import LeaderElection
from services.scheduler.placement_loop import PlacementSettings, start_placement

pytestmark = pytest.mark.integration
TTL_S = 2
TIMEOUT_S = 2.0


async def until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await condition() if asyncio.iscoroutinefunction(condition) else condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_one_leader_of_two_and_takeover_when_its_lease_is_revoked(etcd_server: EtcdServer):
    key = f"/test/leader-{uuid.uuid4().hex}"
    async with etcd.connect(etcd_server.endpoint, TIMEOUT_S) as client:
        electors = [LeaderElection(client, key, name, TTL_S, TIMEOUT_S) for name in ("a", "b")]
        for elector in electors:
            elector.start()
        try:
            await until(lambda: any(e.is_leader for e in electors), 5, "a leader")
            await asyncio.sleep(TTL_S)  # long enough for a second one to sneak in, if it could
            leaders = [e for e in electors if e.is_leader]
            assert len(leaders) == 1
            old, _other = leaders[0], next(e for e in electors if e is not leaders[0])
            stale_fence = old.fence()
            held = await client.get(key.encode())
            await client.revoke_lease(held.lease)  # the leader's lease is lost
            await until(lambda: not old.is_leader, 1, "the old leader to step down")
            # The follower takes over within the TTL (the deposed one waits half a TTL first;
            # on a loaded machine it may still win the race, which is as good an outcome).
            await until(lambda: any(e.is_leader for e in electors), TTL_S, "a new leader")
            assert (await client.get(key.encode())).create_revision > held.create_revision
            tx = client.transactions
            won, _ = await client.transaction(
                compare=[stale_fence], success=[tx.put(f"{key}/x".encode(), b"stale")],
                failure=[])
            assert not won  # the deposed leader's fenced write is refused
            assert await client.get(f"{key}/x".encode()) is None
            await until(lambda: sum(e.is_leader for e in electors) == 1, 5, "a single leader")
        finally:
            for elector in electors:
                await elector.close()
        assert await client.get(key.encode()) is None  # closing stepped down and revoked


async def test_a_closed_leader_is_replaced_at_once(etcd_server: EtcdServer):
    key = f"/test/leader-{uuid.uuid4().hex}"
    async with etcd.connect(etcd_server.endpoint, TIMEOUT_S) as client:
        first = LeaderElection(client, key, "first", TTL_S, TIMEOUT_S)
        first.start()
        await until(lambda: first.is_leader, 5, "the first leader")
        second = LeaderElection(client, key, "second", TTL_S, TIMEOUT_S)
        second.start()
        try:
            await asyncio.sleep(0.3)
            assert first.is_leader and not second.is_leader
            await first.close()
            await until(lambda: second.is_leader, TTL_S, "the second to take over")
            assert (await client.get(key.encode())).value == b"second"
        finally:
            await first.close()
            await second.close()


def version_record(name: str, vid: str, memory_mib: int) -> dict:
    manifest = {"name": name,
                "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 64,
                           "gpu_memory_mib": memory_mib}}
    return {"schema": 1, "version_id": vid, "manifest": manifest, "registered_at": 1.0}


def replica_record(rid: str, zone: str, models=(), errors=None) -> dict:
    return {"schema": 1, "replica_id": rid, "grpc_endpoint": "127.0.0.1:1", "zone": zone,
            "gpu_type": "test-gpu", "gpu_memory_mib": 40_000, "models": list(models),
            "healthy": True, "ready": True, "draining": False,
            "placement_errors": errors or {}}


async def test_the_leader_places_models_on_replicas_and_moves_a_failed_load(
    etcd_server: EtcdServer,
):
    tag = uuid.uuid4().hex[:8]
    name = f"m-{tag}"
    v1, v2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    big, small = served_model_name(name, v2), served_model_name(name, v1)  # each its own model
    r1, r2, r3 = f"r1-{tag}", f"r2-{tag}", f"r3-{tag}"
    async with etcd.connect(etcd_server.endpoint, TIMEOUT_S) as client:
        await client.put(etcd.Keys.model_version(name, v1).encode(),
                         etcd.encode(version_record(name, v1, 10_000)))
        await client.put(etcd.Keys.model_version(name, v2).encode(),
                         etcd.encode(version_record(name, v2, 30_000)))
        await client.put(etcd.Keys.model_routing(name).encode(), etcd.encode(
            {"schema": 2, "revision": 2, "production": v2, "previous": v1}))
        for rid, zone in ((r1, "a"), (r2, "b")):
            await client.put(etcd.Keys.replica(rid).encode(),
                             etcd.encode(replica_record(rid, zone)))
        # Draining, with a model nothing wants: nothing to tell it, so no placement key at all.
        await client.put(etcd.Keys.replica(r3).encode(), etcd.encode(
            replica_record(r3, "a", models=[f"other-{tag}"]) | {"draining": True}))
        settings = PlacementSettings(
            interval_s=0.3, leader_ttl_s=TTL_S, min_copies=2, demand_publish_s=0.2,
            default_capacity={"*": {"prefill_tokens_per_s": 1000, "decode_tokens_per_s": 100}})
        cleanups, meters = [], []
        for instance in ("s1", "s2"):  # two schedulers: one places, both meter demand
            ctx = ServiceContext(
                settings=ServiceSettings(etcd_endpoint=etcd_server.endpoint,
                                         instance_id=f"{instance}-{tag}"),
                server=None, etcd=client, health=None)
            meters.append(settings.demand_meter())
            cleanups.append(await start_placement(ctx, meters[-1], settings))
        try:
            async def placements() -> dict[str, set[str]]:
                found = {}
                for rid in (r1, r2):
                    got = await client.get(etcd.Keys.placement(rid).encode())
                    found[rid] = set(etcd.decode(got.value)["models"]) if got else set()
                return found

            async def placed() -> bool:
                mine = {rid: models & {big, small} for rid, models in (await placements()).items()}
                return sum(big in m for m in mine.values()) == 2 and \
                    sum(small in m for m in mine.values()) == 1

            await until(placed, 10, "both copies of production and one of previous")
            first = await placements()
            holder_of_big = next(rid for rid in (r1, r2) if big in first[rid])
            record = PlacementRecord.decode(etcd.decode(
                (await client.get(etcd.Keys.placement(holder_of_big).encode())).value))
            assert record.versions[big] == f"{name}@{v2}"  # what the replica fetches
            assert await client.get(etcd.Keys.placement(r3).encode()) is None
            holder = next(rid for rid in (r1, r2) if small in first[rid])
            other = r2 if holder == r1 else r1
            # The previous version fails to load where it was placed: it moves to the other
            # replica (memory allows), and the failing pair is not retried.
            await client.put(etcd.Keys.replica(holder).encode(), etcd.encode(replica_record(
                holder, "a" if holder == r1 else "b", models=[big],
                errors={small: "failed to load"})))

            async def moved() -> bool:
                now = await placements()
                return small in now[other] and small not in now[holder]

            await until(moved, 10, "the failed model to move")
            # Demand on both schedulers: the leader sums it into the autoscaling signal.
            for meter in meters:
                meter.on_release(big, 50_000, 5_000)

            def desired() -> float | None:
                value = REGISTRY.get_sample_value("infermesh_scheduler_desired_replicas",
                                                  {"model": big})
                return value if value and value > 2 else None

            assert await until(desired, 10, "the desired replicas to grow") > 2
            leaders = await client.get(etcd.Keys.scheduler_leader.encode())
            assert leaders.value.decode() in (f"s1-{tag}", f"s2-{tag}")
        finally:
            for cleanup in cleanups:
                await cleanup()
            for rid in (r1, r2, r3):
                await client.delete(etcd.Keys.replica(rid).encode())
                await client.delete(etcd.Keys.placement(rid).encode())
            await client.delete_prefix(f"{etcd.Keys.models}{name}/".encode())


async def test_a_failed_start_leaves_nothing_running():
    """etcd unreachable: start_placement raises, and no task of it is left behind."""
    async with etcd.connect("127.0.0.1:1", 0.5) as unreachable:
        ctx = ServiceContext(settings=ServiceSettings(etcd_timeout_s=0.5), server=None,
                             etcd=unreachable, health=None)
        with pytest.raises(aetcd.exceptions.ConnectionFailedError):
            await start_placement(ctx, PlacementSettings().demand_meter(), PlacementSettings())
    names = {"demand publisher", "placement leader", "leader election"}
    assert not [t for t in asyncio.all_tasks() if t.get_name() in names and not t.done()]


async def test_the_placement_of_a_replica_gone_for_good_is_deleted(etcd_server: EtcdServer):
    """A scaled-in pod never comes back: its `placements/` key must not live for ever, while a
    replica that is only restarting keeps its placement."""
    tag = uuid.uuid4().hex[:8]
    gone, restarting = f"gone-{tag}", f"back-{tag}"
    now = [1000.0]
    settings = PlacementSettings(leader_ttl_s=TTL_S, forget_gone_after_s=60)
    async with etcd.connect(etcd_server.endpoint, TIMEOUT_S) as client:
        for rid in (gone, restarting):
            await client.put(etcd.Keys.placement(rid).encode(),
                             etcd.encode(PlacementRecord(frozenset({"m"}), 1).encode()))
        caches = [etcd.WatchCache(client, etcd.Keys.replicas, placement_loop._replica),
                  etcd.WatchCache(client, etcd.Keys.models, etcd.parse_models_key),
                  etcd.WatchCache(client, etcd.Keys.placements,
                                  lambda _s, raw: PlacementRecord.decode(etcd.decode(raw))),
                  etcd.WatchCache(client, etcd.Keys.scheduler_demand_prefix,
                                  placement_loop._decode)]
        for cache in caches:
            await cache.start()
        election = LeaderElection(client, f"{etcd.Keys.scheduler_leader}-{tag}", f"p-{tag}",
                                  TTL_S, TIMEOUT_S)
        election.start()
        placer = placement_loop.Placer(client, election, settings, *caches, timeout_s=TIMEOUT_S,
                                       clock=lambda: now[0])
        try:
            await until(lambda: election.is_leader, 10, "leadership")
            await until(lambda: {gone, restarting} <= caches[2].items.keys(), 10, "the watch")
            await placer.round()  # both absent: remembered, nothing deleted yet
            now[0] += 30
            await client.put(etcd.Keys.replica(restarting).encode(),
                             etcd.encode(replica_record(restarting, "a", models=["m"])))
            await until(lambda: restarting in caches[0].items, 10, "the replica's record")
            now[0] += 31
            await placer.round()
            assert await client.get(etcd.Keys.placement(gone).encode()) is None
            assert await client.get(etcd.Keys.placement(restarting).encode()) is not None
        finally:
            await election.close()
            for cache in caches:
                await cache.stop()
            for rid in (gone, restarting):
                await client.delete(etcd.Keys.replica(rid).encode())
                await client.delete(etcd.Keys.placement(rid).encode())
