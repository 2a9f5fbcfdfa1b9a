"""The scheduler's control loop: elect a leader; the leader sizes and places models.

Every scheduler instance meters the demand of the routes it releases (`DemandMeter`) and
publishes its rates under its own lease (`scheduler/demand/<instance>`), because any instance
may route. The elected leader, every `interval_s` and on every change to the replicas or the
registry's models:

    demand (summed over instances) → desired replicas per Triton model (`Autoscaler`, exported as
    infermesh_scheduler_desired_replicas) → wanted models (registry routing) → `place` →
    `placements/<replica>` written where the decision changed, fenced on the leader key

`start_placement(ctx, meter, settings)` starts all of it and returns the cleanup coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import etcd
from services.common.logs import get_logger
from services.common.records import PlacementRecord
from services.common.runtime import ServiceContext
from services.common.tasks import cancel_and_wait
from services.registry.catalog import ModelCatalog
from services.scheduler.autoscale import Autoscaler, ScalePolicy, TokenRates
from services.scheduler.demand import DemandMeter
from services.scheduler.leader import LeaderElection
from services.scheduler.placement import (
    LoadBackoff,
    ReplicaState,
    model_memory,
    place,
    version_refs,
    wanted_models,
)

log = get_logger(__name__)
SCHEMA = 1
DESIRED = Gauge("infermesh_scheduler_desired_replicas",
                "Replicas each Triton model needs for its measured demand (leader only).",
                ["model"])
DEMAND = Gauge("infermesh_scheduler_demand_tokens_per_second",
               "Token demand over all schedulers (leader only), by phase and window.",
               ["model", "phase", "window"])
SHORTFALL = Gauge("infermesh_scheduler_placement_shortfall",
                  "Copies wanted that no replica could take (memory, zones, failures).",
                  ["model"])
WRITES = Counter("infermesh_scheduler_placement_writes_total",
                 "Placement keys written by the leader, by outcome.", ["outcome"])
LOAD_FAILURES = Counter("infermesh_scheduler_placement_load_failures_total",
                        "Model loads a sidecar reported failed (each starts a back-off).",
                        ["model"])


class Capacity(BaseModel):
    """One replica's throughput for a model, in tokens/s."""

    prefill_tokens_per_s: float = Field(gt=0)
    decode_tokens_per_s: float = Field(gt=0)


# The torch engine (SmolLM2-135M, float32) on the project's 2-core CPU machines, rounded down:
# ~43 tokens/s of decode at 8 streams (docs/benchmarks.md), ~555 prompt tokens/s of prefill.
# GPU fleets configure their own types; replicas that report calibrated capacity override both.
DEFAULT_CAPACITY = {"*": Capacity(prefill_tokens_per_s=500, decode_tokens_per_s=40)}


class PlacementSettings(BaseSettings):
    """The placement leader's settings, from `INFERMESH_PLACEMENT_<FIELD>` variables."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_PLACEMENT_", extra="ignore")

    enabled: bool = Field(True, description="Run the election and, when leader, placement.")
    interval_s: float = Field(5.0, gt=0, le=300, description="Placement rounds at least this "
                              "often; changes to replicas or models start one sooner.")
    leader_ttl_s: int = Field(5, ge=2, le=60, description="Lease TTL of the leader key: the "
                              "longest a lost leader goes unreplaced.")
    min_copies: int = Field(1, ge=1, le=1000, description="Copies of every production version.")
    headroom: float = Field(0.2, ge=0, le=10, description="Spare capacity over the demand "
                            "(0.2 = 20 %).")
    scale_out_window_s: float = Field(30.0, ge=1, le=3600,
                                      description="Demand window that scales out at once.")
    scale_in_window_s: float = Field(600.0, ge=1, le=86400,
                                     description="Demand window that scale-in must also allow.")
    scale_in_cooldown_s: float = Field(300.0, ge=0, le=86400,
                                       description="No scale-in sooner after any change.")
    default_capacity: dict[str, Capacity] = Field(
        default_factory=lambda: dict(DEFAULT_CAPACITY),
        description="Per-replica tokens/s by GPU type ('*': any other), for models whose "
                    "replicas report no calibrated capacity. JSON.")
    load_retry_s: float = Field(30.0, gt=0, le=3600,
                                description="First delay before a failed load is retried.")
    load_retry_max_s: float = Field(600.0, gt=0, le=86400,
                                    description="Longest delay between retries of a failed load.")
    demand_publish_s: float = Field(5.0, gt=0, le=300,
                                    description="How often each scheduler publishes its demand.")
    forget_gone_after_s: float = Field(
        600.0, ge=60, le=86400, description="A replica without a record this long has its "
        "placement deleted (a scaled-in pod's; a restarting replica is back well before).")

    @model_validator(mode="after")
    def _ordered(self) -> PlacementSettings:
        if self.scale_in_window_s < self.scale_out_window_s:
            raise ValueError("scale_in_window_s: must be >= scale_out_window_s "
                             f"({self.scale_out_window_s:g})")
        if self.load_retry_max_s < self.load_retry_s:
            raise ValueError(f"load_retry_max_s: must be >= load_retry_s ({self.load_retry_s:g})")
        return self

    def demand_meter(self, clock: Callable[[], float] = time.monotonic) -> DemandMeter:
        """The meter whose `on_release` the scheduler servicer calls."""
        return DemandMeter(max(self.scale_in_window_s, self.scale_out_window_s), clock)

    def capacity_for(self, gpu_type: str) -> TokenRates | None:
        found = self.default_capacity.get(gpu_type) or self.default_capacity.get("*")
        if found is None:
            return None
        return TokenRates(found.prefill_tokens_per_s, found.decode_tokens_per_s)


def _decode(_suffix: str, raw: bytes) -> Any:
    return etcd.decode(raw)


def _replica(_suffix: str, raw: bytes) -> ReplicaState:
    return ReplicaState.from_record(etcd.decode(raw))


def demand_record(meter: DemandMeter, settings: PlacementSettings) -> dict[str, Any]:
    """This instance's demand as it publishes it: per model, short and long window rates."""
    models = {}
    for model in meter.models():
        short = meter.rates(model, settings.scale_out_window_s)
        long = meter.rates(model, settings.scale_in_window_s)
        models[model] = {"short": [short.prefill_tokens_per_s, short.decode_tokens_per_s],
                         "long": [long.prefill_tokens_per_s, long.decode_tokens_per_s]}
    return {"schema": SCHEMA, "models": models}


def total_demand(records: list[dict[str, Any]]) -> dict[str, dict[str, TokenRates]]:
    """Triton model → {"short", "long"} → summed over every scheduler's published demand."""
    sums: dict[str, dict[str, list[float]]] = {}
    for record in records:
        try:
            if record.get("schema") != SCHEMA:
                raise ValueError(f"schema {record.get('schema')!r}")
            rates = {model: {window: (float(windows[window][0]), float(windows[window][1]))
                             for window in ("short", "long")}
                     for model, windows in record["models"].items()}
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            # One scheduler of another version (a rolling upgrade), or an edited key, must not
            # stop placement: its demand is left out, loudly.
            log.warning("demand_record_skipped", error=repr(exc))
            continue
        for model, windows in rates.items():
            for window, (prefill, decode) in windows.items():
                acc = sums.setdefault(model, {}).setdefault(window, [0.0, 0.0])
                acc[0] += prefill
                acc[1] += decode
    return {model: {w: TokenRates(*v) for w, v in windows.items()}
            for model, windows in sums.items()}


def replica_capacity(
    model: str, replicas: list[ReplicaState], settings: PlacementSettings
) -> TokenRates | None:
    """The median calibrated capacity the replicas report for `model`; else the configured
    default for the GPU type most of the eligible replicas have."""
    reported = [r.capacity[model] for r in replicas if model in r.capacity]
    if reported:
        return TokenRates(statistics.median(p for p, _ in reported),
                          statistics.median(d for _, d in reported))
    types = [r.gpu_type for r in replicas if r.eligible]
    gpu_type = max(set(types), key=lambda t: (types.count(t), t)) if types else ""
    return settings.capacity_for(gpu_type)


class Placer:
    """The leader's rounds: demand → desired replicas → placement → `placements/` writes."""

    def __init__(self, client: aetcd.Client, election: LeaderElection, settings: PlacementSettings,
                 replicas: etcd.WatchCache[ReplicaState], models: etcd.WatchCache[Any],
                 placements: etcd.WatchCache[PlacementRecord], demand: etcd.WatchCache[Any],
                 timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self._etcd = client
        self._timeout_s = timeout_s
        self._election = election
        self._settings = settings
        self._replicas = replicas
        self._models = models
        self._placements = placements
        self._demand = demand
        self._clock = clock
        self._written: dict[str, PlacementRecord] = {}  # ours, until the watch shows them
        self._absent_since: dict[str, float] = {}  # placed replicas with no record, since when
        self._exported: dict[Gauge, set[tuple[str, ...]]] = {}
        self._backoff = LoadBackoff(settings.load_retry_s, settings.load_retry_max_s)
        self._autoscaler = Autoscaler(
            ScalePolicy(headroom=settings.headroom, zones=1, min_copies=settings.min_copies,
                        scale_in_cooldown_s=settings.scale_in_cooldown_s), clock)

    def current(self) -> dict[str, PlacementRecord]:
        """Replica id → the placement record in force (ours when the watch lags behind)."""
        view = dict(self._placements.items)
        for rid, record in self._written.items():
            if rid not in view or record.generation >= view[rid].generation:
                view[rid] = record
        return view

    def desired(self, replicas: list[ReplicaState]) -> dict[str, int]:
        zones = len({r.zone for r in replicas if r.eligible}) or 1
        self._autoscaler.policy = dataclasses.replace(self._autoscaler.policy, zones=zones)
        demand = total_demand(list(self._demand.items.values()))
        desired: dict[str, int] = {}
        rates_by_label: dict[tuple[str, ...], float] = {}
        for model, windows in demand.items():
            for window, rates in windows.items():
                rates_by_label[(model, "prefill", window)] = rates.prefill_tokens_per_s
                rates_by_label[(model, "decode", window)] = rates.decode_tokens_per_s
            capacity = replica_capacity(model, replicas, self._settings)
            if capacity is None:
                continue
            zero = TokenRates(0.0, 0.0)
            serving = sum(1 for r in replicas if model in r.loaded)
            desired[model] = self._autoscaler.desired(
                model, windows.get("short", zero), windows.get("long", zero), capacity, serving)
        for model in self._autoscaler.models() - set(desired):
            self._autoscaler.forget(model)
        self._export(DEMAND, rates_by_label)
        return desired

    def _export(self, gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
        """Sets `values` and removes the labels set last round but not now (no stale series,
        and no moment without any: /metrics is scraped from another thread)."""
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        for labels in self._exported.get(gauge, set()) - set(values):
            gauge.remove(*labels)
        self._exported[gauge] = set(values)

    async def round(self) -> int:
        """One placement round (leader only); returns how many placement keys it wrote."""
        if not self._election.is_leader:
            return 0
        now = self._clock()
        replicas = sorted(self._replicas.items.values(), key=lambda r: r.replica_id)
        catalog = ModelCatalog()
        catalog.rebuild(self._models.items)
        entries = catalog.models()
        desired = self.desired(replicas)
        wanted = wanted_models(entries, desired, self._settings.min_copies)
        self._export(DESIRED, {(w.triton_model,): max(w.copies, desired.get(w.triton_model, 0))
                               for w in wanted})
        current = self.current()
        told = {rid: record.models for rid, record in current.items()}
        for rid, model in self._backoff.observe(replicas, told, now):
            LOAD_FAILURES.labels(model).inc()
            log.warning("placement_load_failed", replica=rid, model=model)
        refs = version_refs(entries)
        decision = place(replicas, wanted, pending=told, blocked=self._backoff.blocked(now),
                         memory=model_memory(entries))
        self._export(SHORTFALL, {(m,): n for m, n in decision.shortfalls.items()})
        for rid, model in decision.evicted:
            log.info("placement_evicted", replica=rid, model=model)
        written = 0
        loaded = {r.replica_id: r.loaded for r in replicas}
        for rid, models in decision.models.items():
            previous = current.get(rid)
            if previous is None and models == loaded[rid]:
                continue  # no key means "keep what you have": nothing to say yet
            versions = {m: refs[m] for m in models if m in refs}
            if previous is not None and (previous.models, previous.versions) == (models, versions):
                continue
            generation = (previous.generation if previous else 0) + 1
            record = PlacementRecord(frozenset(models), generation, versions)
            if not await self._write(rid, record):
                break
            written += 1
        await self._forget_gone(current, {r.replica_id for r in replicas}, now)
        return written

    async def _forget_gone(self, current: dict[str, PlacementRecord], present: set[str],
                           now: float) -> None:
        """Deletes the placements of replicas gone for `forget_gone_after_s` (pods of a fleet
        that scaled in never come back; a restarting replica is back well before)."""
        for rid in list(self._absent_since):
            if rid in present or rid not in current:
                del self._absent_since[rid]
        for rid in current.keys() - present:
            since = self._absent_since.setdefault(rid, now)
            if now - since < self._settings.forget_gone_after_s:
                continue
            if not await self._fenced(self._etcd.transactions.delete(
                    etcd.Keys.placement(rid).encode())):
                return
            self._written.pop(rid, None)
            self._absent_since.pop(rid, None)
            log.info("placement_forgotten", replica=rid, absent_s=round(now - since, 1))

    async def _write(self, replica_id: str, record: PlacementRecord) -> bool:
        """Writes one placement if we still lead (fenced); False when leadership is gone."""
        won = await self._fenced(self._etcd.transactions.put(
            etcd.Keys.placement(replica_id).encode(), etcd.encode(record.encode())))
        if won:
            self._written[replica_id] = record
            log.info("placement_written", replica=replica_id, models=sorted(record.models),
                     generation=record.generation)
        return won

    async def _fenced(self, tx_op: Any) -> bool:
        """One etcd operation, only while we lead (compared in the same transaction)."""
        if not self._election.is_leader:
            return False
        async with asyncio.timeout(self._timeout_s):
            won, _ = await self._etcd.transaction(
                compare=[self._election.fence()], success=[tx_op], failure=[])
        WRITES.labels("written" if won else "fenced").inc()
        return won

    def stepped_down(self) -> None:
        """A follower exports no signal, so that `max()` over schedulers reads the leader's."""
        for gauge in (DESIRED, DEMAND, SHORTFALL):
            self._export(gauge, {})
        self._written.clear()
        self._absent_since.clear()  # a later term starts counting afresh


async def _publish_demand(lease: etcd.LeaseKeeper, key: str, meter: DemandMeter,
                          settings: PlacementSettings, timeout_s: float) -> None:
    """Every `demand_publish_s`, and at once when a model starts to have demand."""
    published = None
    new_model = asyncio.Event()
    meter.on_new_model = new_model.set
    while True:
        new_model.clear()
        record = demand_record(meter, settings)
        if record != published:
            try:
                async with asyncio.timeout(timeout_s):
                    await lease.put(key, record)
                published = record
            except Exception as exc:  # etcd away or slow: publish when it is back
                log.warning("demand_publish_failed", error=repr(exc))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.demand_publish_s):
                await new_model.wait()


async def _lead(placer: Placer, election: LeaderElection, changed: asyncio.Event,
                settings: PlacementSettings) -> None:
    was_leader = False
    while True:
        if election.is_leader:
            was_leader = True
            changed.clear()
            try:
                await placer.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd away or slow: the next round tries again
                log.warning("placement_round_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.interval_s):
                    await changed.wait()
            await asyncio.sleep(min(0.5, settings.interval_s))  # a burst of changes: one round
        else:
            if was_leader:
                placer.stepped_down()
                was_leader = False
            await election.wait_changed(settings.interval_s)


async def start_placement(
    ctx: ServiceContext, meter: DemandMeter, settings: PlacementSettings | None = None
) -> Callable[[], Awaitable[None]]:
    """Publishes this instance's demand, campaigns for leadership and, while leader, places
    models. Returns the cleanup, which steps down first (another instance takes over at once).
    A failed start undoes what it had started before it raises."""
    settings = settings or PlacementSettings()
    timeout_s = ctx.settings.etcd_timeout_s
    async with contextlib.AsyncExitStack() as starting:
        demand_lease = etcd.LeaseKeeper(ctx.etcd, settings.leader_ttl_s)
        starting.push_async_callback(demand_lease.close)
        async with asyncio.timeout(timeout_s):
            await demand_lease.start()
        publisher = asyncio.create_task(_publish_demand(
            demand_lease, etcd.Keys.scheduler_demand(ctx.settings.instance_id), meter, settings,
            timeout_s), name="demand publisher")
        starting.push_async_callback(cancel_and_wait, publisher)
        if settings.enabled:
            changed = asyncio.Event()
            caches = [
                etcd.WatchCache(ctx.etcd, etcd.Keys.replicas, _replica, on_change=changed.set),
                etcd.WatchCache(ctx.etcd, etcd.Keys.models, etcd.parse_models_key,
                                on_change=changed.set),
                etcd.WatchCache(ctx.etcd, etcd.Keys.placements,
                                lambda _suffix, raw: PlacementRecord.decode(etcd.decode(raw))),
                etcd.WatchCache(ctx.etcd, etcd.Keys.scheduler_demand_prefix, _decode,
                                on_change=changed.set),
            ]
            for cache in caches:
                starting.push_async_callback(cache.stop)
                await cache.start(timeout_s * 5)
            election = LeaderElection(ctx.etcd, etcd.Keys.scheduler_leader,
                                      ctx.settings.instance_id, settings.leader_ttl_s, timeout_s)
            starting.push_async_callback(election.close)
            election.start()
            placer = Placer(ctx.etcd, election, settings, *caches, timeout_s=timeout_s)
            leading = asyncio.create_task(_lead(placer, election, changed, settings),
                                          name="placement leader")
            starting.push_async_callback(cancel_and_wait, leading)
        running = starting.pop_all()
    return running.aclose

