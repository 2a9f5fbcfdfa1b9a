"""Automatic canary rollback: while a model has a canary, scrape every gateway's /metrics, judge
the canary against production over a sliding window (`canary.py`), and clear a canary that
breaches, with the figures as the reason in the model's history and the audit log.

The clear is the same compare-and-swap an admin makes, on the routing revision the judgement was
made against: if an admin changed the model meanwhile, theirs stands and this judgement is
dropped. Several registry instances may judge at once; the CAS lets exactly one clear happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import aetcd
from prometheus_client import Counter

from services.common import errors, etcd
from services.common.logs import get_logger
from services.common.records import ReplicaRecord
from services.common.slo import SloConfig
from services.registry.canary import (
    CanaryPolicy,
    Prices,
    SlidingWindow,
    VersionCounts,
    judge,
    parse_gateway_metrics,
)
from services.registry.catalog import ModelCatalog
from services.registry.manifest import ModelVersion
from services.registry.rollout import ClearCanary
from services.registry.store import RegistryStore

ACTOR = "registry/auto-rollback"
log = get_logger(__name__)
ROLLBACKS = Counter("infermesh_registry_auto_rollbacks_total",
                    "Canaries cleared by the automatic judge.", ["model"])
SCRAPE_FAILURES = Counter("infermesh_registry_canary_scrape_failures_total",
                          "Gateway /metrics scrapes that failed (that gateway is left out).")


def _parse_service(_suffix: str, raw: bytes) -> dict[str, Any]:
    return etcd.decode(raw)


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def unloadable(model: str, replicas: Iterable[ReplicaRecord]) -> str | None:
    """Why a canary that no replica serves can never take traffic: a replica reports that
    loading it failed (the rollout sends canary traffic only to loaded versions, so such a
    canary would otherwise linger unjudged)."""
    for replica in sorted(replicas, key=lambda r: r.replica_id):
        if model in replica.placement_errors:
            return f"its engine failed to load on {replica.replica_id}: " \
                f"{replica.placement_errors[model][:500]}"
    return None


def prices(version: ModelVersion) -> Prices:
    return Prices(version.cost_per_1k_input_tokens, version.cost_per_1k_output_tokens)


class AutoRollback:
    def __init__(
        self, client: aetcd.Client, catalog: ModelCatalog, store: RegistryStore,
        slo: SloConfig, policy: CanaryPolicy, interval_s: float, scrape_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._catalog = catalog
        self._store = store
        self._slo = slo
        self._policy = policy
        self._interval_s = interval_s
        self._scrape_timeout_s = scrape_timeout_s
        self._clock = clock
        self._window = SlidingWindow(policy.window_s)
        self._gateways: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
            client, etcd.Keys.services + "gateway/", _parse_service)
        self._replicas: etcd.WatchCache[ReplicaRecord] = etcd.WatchCache(
            client, etcd.Keys.replicas, lambda _suffix, raw: ReplicaRecord.decode(etcd.decode(raw)),
            on_change=self._note_load_failures)
        # Triton model → why it last failed to load: a replica reports a failed load only until
        # placement moves the model away (seconds), so it is remembered between judgements.
        self._load_failures: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._gateways.start()
        await self._replicas.start()
        self._task = asyncio.create_task(self._judge_forever(), name="canary auto-rollback")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._gateways.stop()
        await self._replicas.stop()

    async def _judge_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad round must not stop the judge
                log.error("canary_check_failed", error=repr(exc))

    async def check(self) -> list[str]:
        """One round: scrape, judge every canary, clear the ones that breach. Returns the
        models whose canary this round cleared."""
        canaries = [e for e in self._catalog.models() if e.routing.canary]
        canary_models = {e.versions[e.routing.canary].triton_model_name for e in canaries
                         if e.routing.canary in e.versions}
        self._load_failures = {m: why for m, why in self._load_failures.items()
                               if m in canary_models}
        if not canaries:
            self._window = SlidingWindow(self._policy.window_s)  # the next canary starts afresh
            return []
        await self._scrape()
        cleared = []
        for entry in canaries:
            routing = entry.routing
            canary = entry.versions.get(routing.canary)
            production = entry.versions.get(routing.production)
            if canary is None or production is None:
                continue
            objective = self._slo.tiers[self._slo.tier_of(entry.name)].availability
            replicas = list(self._replicas.items.values())
            if any(canary.triton_model_name in replica.models for replica in replicas):
                reason = judge(
                    self._window.delta((entry.name, canary.version_id)),
                    self._window.delta((entry.name, production.version_id)),
                    self._policy, objective, prices(canary), prices(production),
                )
            else:  # loading (judged once it serves), or unable to load
                reason = self._load_failures.get(canary.triton_model_name)
            if reason is None:
                continue
            try:
                await self._store.change_routing(
                    entry.name, routing.revision, ClearCanary(), ACTOR,
                    f"automatic rollback of canary {canary.version_id}: {reason}")
            except (errors.FailedPrecondition, errors.Unavailable) as exc:
                log.info("auto_rollback_skipped", model=entry.name, error=exc.message)
                continue
            ROLLBACKS.labels(entry.name).inc()
            log.warning("canary_rolled_back", model=entry.name, canary=canary.version_id,
                        reason=reason)
            cleared.append(entry.name)
        return cleared

    def _note_load_failures(self) -> None:
        records = list(self._replicas.items.values())
        for record in records:
            for model in record.placement_errors:
                if not any(model in other.models for other in records):
                    self._load_failures[model] = unloadable(model, records) or ""
            for model in record.models:  # it loads somewhere now: judged by its traffic
                self._load_failures.pop(model, None)

    async def _scrape(self) -> None:
        targets = {suffix: record["metrics"] for suffix, record in self._gateways.items.items()
                   if record.get("metrics")}
        results = await asyncio.gather(
            *(self._scrape_one(endpoint) for endpoint in targets.values()),
            return_exceptions=True)
        now = self._clock()
        for gateway, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                SCRAPE_FAILURES.inc()
                log.warning("gateway_scrape_failed", gateway=gateway, error=repr(result))
                continue
            self._window.add(gateway, now, result)

    async def _scrape_one(self, endpoint: str) -> dict[tuple[str, str], VersionCounts]:
        async with asyncio.timeout(self._scrape_timeout_s):
            text = await asyncio.to_thread(
                _fetch, f"http://{endpoint}/metrics", self._scrape_timeout_s)
        return parse_gateway_metrics(text, self._slo.client_error_codes)
