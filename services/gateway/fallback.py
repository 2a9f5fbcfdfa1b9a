"""Degraded routing: when no scheduler instance answers within a short budget, the gateway routes
by itself from its own watched view of the replicas, and goes back to the schedulers as soon as
one answers (docs/decisions.md § "A gateway routes on its own when no scheduler answers").

    route ──▶ a scheduler (rendezvous owner, then the next)  ── answered ──▶ its route
                 │ none answered within `budget_s` (down, frozen, none registered)
                 ▼
              FallbackRouter.pick: healthy, not draining, serving the version, fresh load report,
              breaker closed (or its half-open probe) → least loaded by this gateway's own
              in-flight count plus the replica's last load report

While degraded, one route at most every `retry_s` asks the schedulers first (the others go
straight to the fallback), so a frozen scheduler costs the budget once per `retry_s`, not once
per request. What the fallback gives up: prefix affinity (it does not see the schedulers'
prefix index) and reservations shared across gateways (each counts only its own in-flight).

`FallbackRouter` is pure (time passed in); `ResilientRouting` is the `Routing` the pipeline uses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd
from prometheus_client import Counter, Gauge

from services.common import errors, etcd
from services.common.breakers import BreakerSettings, BreakerState, CircuitBreaker
from services.common.logs import get_logger
from services.common.outcome import Outcome
from services.common.records import LoadReport, ReplicaRecord
from services.gateway.peers import Route, SchedulerClient, SchedulersAway

__all__ = ["FALLBACK_PREFIX", "FallbackConfig", "FallbackRouter", "LoadReports",
           "ResilientRouting"]

log = get_logger(__name__)

FALLBACK_ROUTES = Counter(
    "infermesh_gateway_fallback_routes_total",
    "Routes this gateway chose by itself because no scheduler instance answered in time.")
FALLBACK_ACTIVE = Gauge(
    "infermesh_gateway_fallback_routing",
    "1 while this gateway routes by itself (no scheduler answers), 0 while schedulers route.")
BREAKER_TRANSITIONS = Counter(
    "infermesh_gateway_breaker_transitions_total",
    "State changes of the gateway's own per-replica breakers (used by its fallback routing).",
    ["replica", "state"])

FALLBACK_PREFIX = "fallback/"  # reservation ids of the gateway's own routes


@dataclass(frozen=True)
class FallbackConfig:
    budget_s: float = 1.0  # how long the schedulers get to answer a route before the fallback
    retry_s: float = 0.5  # while degraded, how often a route asks the schedulers again
    load_stale_after_s: float = 1.5  # a replica whose load report is older is skipped
    queue_scale: int = 8  # a load report's running + waiting counts this many times less ...
    # ... than one of this gateway's own in-flight generations when the report gives no `max`
    breaker: BreakerSettings = field(default_factory=BreakerSettings)


@dataclass(frozen=True)
class Ticket:
    """A route this gateway counts (whoever chose it) until its release."""

    replica_id: str
    probe: bool  # the half-open breaker's probe: its outcome decides the breaker


class FallbackRouter:
    """Per-replica in-flight counts and breakers, and the choice of a replica without a
    scheduler. Every route the gateway makes is counted here (`routed` / `released`), the
    schedulers' too, so the counts and breakers are warm when the fallback takes over."""

    def __init__(self, config: FallbackConfig, zone: str = ""):
        self.config = config
        self._zone = zone
        self.in_flight: dict[str, int] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self.not_closed: set[str] = set()

    def breaker(self, replica_id: str) -> CircuitBreaker:
        breaker = self._breakers.get(replica_id)
        if breaker is None:
            breaker = self._breakers[replica_id] = CircuitBreaker(
                "gateway-replica", replica_id, self.config.breaker, self.not_closed,
                lambda b, state: BREAKER_TRANSITIONS.labels(b.name, state.value).inc())
        return breaker

    def breaker_state(self, replica_id: str) -> BreakerState:
        breaker = self._breakers.get(replica_id)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def pick(
        self, replicas: Iterable[ReplicaRecord], loads: Mapping[str, LoadReport],
        triton_model: str, exclude: Sequence[str], now: float,
    ) -> ReplicaRecord:
        """The least-loaded replica that may serve `triton_model` now; Unavailable if none.

        Load: this gateway's in-flight generations there plus the engine's running + waiting
        for the model from its last report (scaled by its `max`, or `queue_scale`). Ties go to
        this gateway's zone, then to the replica id (stable)."""
        serving = [r for r in replicas if r.healthy and not r.draining
                   and triton_model in r.models and r.replica_id not in exclude]
        horizon = now - self.config.load_stale_after_s
        fresh = [r for r in serving if (report := loads.get(r.replica_id)) is None
                 or report.received_at >= horizon]
        if not fresh and serving and max(r.received_at for r in loads.values()) < horizon:
            # Static stability, as the scheduler's filter: when *every* report is stale the feed
            # broke (etcd away), not every replica.
            fresh = serving
        if self.not_closed:
            fresh = [r for r in fresh if r.replica_id not in self.not_closed
                     or self._breakers[r.replica_id].available(now)]
        if not fresh:
            raise errors.Unavailable(
                f"no scheduler answered and no replica this gateway sees can serve "
                f"{triton_model!r} now", retry_after_s=1.0, reason="fallback_no_replica")
        return min(fresh, key=lambda r: (self._load(r.replica_id, loads, triton_model),
                                          r.zone != self._zone, r.replica_id))

    def _load(self, replica_id: str, loads: Mapping[str, LoadReport], triton_model: str) -> float:
        own = self.in_flight.get(replica_id, 0)
        report = loads.get(replica_id)
        figures = report.models.get(triton_model) if report is not None else None
        if figures is None or figures.queue is None:
            return float(own)
        scale = figures.max or self.config.queue_scale
        return own + figures.queue / scale

    def routed(self, replica_id: str, now: float, chosen_here: bool) -> Ticket:
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        breaker = self._breakers.get(replica_id)
        probe = chosen_here and breaker is not None and breaker.routed(now)
        return Ticket(replica_id, probe)

    def released(self, ticket: Ticket, outcome: Outcome, now: float) -> None:
        left = self.in_flight.get(ticket.replica_id, 1) - 1
        if left > 0:
            self.in_flight[ticket.replica_id] = left
        else:
            self.in_flight.pop(ticket.replica_id, None)
        if outcome.judges:
            self.breaker(ticket.replica_id).record(outcome.failed, now, ticket.probe)
        elif ticket.probe:
            self.breaker(ticket.replica_id).probe_lost()


class LoadReports:
    """A watch of `load/`, each report stamped with its arrival on this gateway's clock."""

    def __init__(self, client: aetcd.Client, clock: Callable[[], float] = time.monotonic):
        def parse(suffix: str, raw: bytes) -> LoadReport:
            record: Any = etcd.decode(raw)
            if not isinstance(record, dict):
                raise ValueError("a load report is a JSON object")
            return LoadReport.from_record(suffix, record, clock())

        self._cache: etcd.WatchCache[LoadReport] = etcd.WatchCache(
            client, etcd.Keys.replica_load, parse)

    @property
    def items(self) -> Mapping[str, LoadReport]:
        return self._cache.items

    async def start(self) -> None:
        await self._cache.start()

    async def stop(self) -> None:
        await self._cache.stop()


class ResilientRouting:
    """The pipeline's `Routing`: the schedulers while one answers, this gateway's own choice
    while none does. Logs when the fallback starts and ends; counts every fallback route."""

    def __init__(
        self, schedulers: SchedulerClient, router: FallbackRouter,
        replicas: Callable[[], Iterable[ReplicaRecord]],
        loads: Callable[[], Mapping[str, LoadReport]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self._schedulers = schedulers
        self._router = router
        self._replicas = replicas
        self._loads = loads
        self._clock = clock
        self._held: dict[str, Ticket] = {}  # reservation id → what it counts, until released
        self.degraded_since: float | None = None
        self._fallback_routes = 0  # in this degraded spell
        self._next_try = 0.0
        self._late_releases: set[asyncio.Future[None]] = set()
        FALLBACK_ACTIVE.set(0)

    @property
    def degraded(self) -> bool:
        return self.degraded_since is not None

    async def route(
        self, triton_model_name: str, version_id: str, request_id: str, hold_s: float,
        exclude: list[str], *, prefix_hashes: Sequence[int] = (), prompt_tokens: int = 0,
        kv_blocks: tuple[Sequence[int], int] = ((), 0),
    ) -> Route:
        now = self._clock()
        if not self.degraded or now >= self._next_try:
            if self.degraded:
                self._next_try = now + self._router.config.retry_s  # one route tries at a time
            asked = asyncio.ensure_future(self._schedulers.route(
                triton_model_name, version_id, request_id, hold_s, exclude,
                prefix_hashes=prefix_hashes, prompt_tokens=prompt_tokens, kv_blocks=kv_blocks))
            try:
                done, _ = await asyncio.wait({asked}, timeout=self._router.config.budget_s)
            except asyncio.CancelledError:
                asked.add_done_callback(self._release_late)
                asked.cancel()
                raise
            route = None
            if not done:  # a grant arriving after the budget would hold a place: released
                asked.add_done_callback(self._release_late)
                self._start_fallback(TimeoutError(f"no scheduler within "
                                                  f"{self._router.config.budget_s:g}s"))
            else:
                try:
                    route = asked.result()
                except SchedulersAway as exc:
                    self._start_fallback(exc)
            if route is not None:
                self._end_fallback()
                self._held[route.reservation_id] = self._router.routed(
                    route.replica_id, self._clock(), chosen_here=False)
                return route
        return self._route_alone(triton_model_name, exclude)

    def _release_late(self, asked: asyncio.Future[Route]) -> None:
        """A scheduler's grant that came after the route gave up on it: freed at once, so a
        slow scheduler is not filled with reservations nobody uses."""
        if asked.cancelled() or asked.exception() is not None:
            return
        release = asyncio.ensure_future(
            self._schedulers.release_route(asked.result().reservation_id))
        self._late_releases.add(release)
        release.add_done_callback(self._late_releases.discard)
        release.add_done_callback(lambda task: task.cancelled() or task.exception())

    def _route_alone(self, triton_model_name: str, exclude: list[str]) -> Route:
        now = self._clock()
        replica = self._router.pick(self._replicas(), self._loads(), triton_model_name, exclude,
                                    now)
        reservation_id = f"{FALLBACK_PREFIX}{uuid.uuid4().hex}"
        self._held[reservation_id] = self._router.routed(replica.replica_id, now,
                                                         chosen_here=True)
        FALLBACK_ROUTES.inc()
        self._fallback_routes += 1
        return Route(replica.replica_id, replica.grpc_endpoint, reservation_id)

    async def release_route(
        self, reservation_id: str, outcome: Outcome = Outcome.UNREPORTED,
        completion_tokens: int = 0,
    ) -> None:
        ticket = self._held.pop(reservation_id, None)
        if ticket is not None:
            self._router.released(ticket, outcome, self._clock())
        if not reservation_id.startswith(FALLBACK_PREFIX):
            await self._schedulers.release_route(reservation_id, outcome, completion_tokens)

    def _start_fallback(self, cause: Exception) -> None:
        now = self._clock()
        self._next_try = now + self._router.config.retry_s
        if self.degraded:
            return
        self.degraded_since = now
        self._fallback_routes = 0
        FALLBACK_ACTIVE.set(1)
        log.warning("fallback_routing_started",
                    reason=str(cause) or f"no scheduler answered within "
                    f"{self._router.config.budget_s}s")

    def _end_fallback(self) -> None:
        if self.degraded_since is None:
            return
        log.warning("fallback_routing_ended", after_s=round(self._clock() - self.degraded_since, 3),
                    fallback_routes=self._fallback_routes)
        self.degraded_since = None
        FALLBACK_ACTIVE.set(0)
