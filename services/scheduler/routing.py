"""Routing: filters → weighted scorers → pick, then a reservation on the chosen replica.

Pure logic with the time passed in (no gRPC, no etcd): the servicer hands it the replicas and
load reports its watch caches hold. Policies (what the routing benchmark compares):

- `precise`: as `kv_aware`, with prefix affinity scored on the blocks each engine reports holding
  (`kv_index.py`, fed by the sidecars' KV events); a replica whose events do not flow is scored
  by the approximate index, so with no events at all it is `kv_aware`;
- `kv_aware`: every scorer (prefix affinity, free KV blocks, queue, zone), weighted;
- `least_loaded`: the queue scorer alone (engine queue + this scheduler's unreported reservations);
- `round_robin`: plain rotation over the candidates that pass the filters.

Reservations are this scheduler's own, each held until released or until its hold expires (so
a gateway that dies leaks nothing for long). Released outcomes feed the circuit breakers.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.common import errors
from services.common.logs import get_logger
from services.scheduler.breakers import NO_PROBES, Breakers, BreakerSettings, Probes
from services.scheduler.candidates import Candidate, RouteQuery, RoutingContext
from services.scheduler.filters import FILTERS, REPLICA_FILTERS
from services.scheduler.inventory import LoadReport, ReplicaInfo
from services.scheduler.kv_index import KvIndex
from services.scheduler.outcome import Outcome
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.scorers import SCORERS

log = get_logger(__name__)


class Policy(enum.StrEnum):
    PRECISE = "precise"
    KV_AWARE = "kv_aware"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class RoutingConfig:
    policy: Policy = Policy.PRECISE
    # kv_aware's scorer weights (llm-d's well-lit path weighs prefix 3, KV 2, queue 2)
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"prefix": 3.0, "kv_free": 2.0, "queue": 2.0, "cache_spread": 0.0,
                                 "zone": 1.0})
    load_stale_after_s: float = 1.5  # a replica silent for longer is skipped
    queue_scale: int = 8  # the engine batch assumed when a load report gives no `max`
    prefix_index_blocks: int = 65_536  # per model
    breakers: BreakerSettings = field(default_factory=BreakerSettings)

    def scorer_weights(self) -> tuple[tuple[str, float], ...]:
        if self.policy in (Policy.KV_AWARE, Policy.PRECISE):
            unknown = set(self.weights) - set(SCORERS)
            if unknown:
                raise ValueError(f"weights: unknown scorers {sorted(unknown)}")
            weights = self.weights.items()
            if self.policy is Policy.PRECISE:  # prefix affinity from what the engines hold
                weights = (("precise_prefix" if name == "prefix" else name, w)
                           for name, w in weights)
            return tuple((name, w) for name, w in weights if w > 0)
        if self.policy is Policy.LEAST_LOADED:
            return (("queue", 1.0),)
        return ()


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    replica: ReplicaInfo
    model: str
    prompt_tokens: int
    created_at: float
    expires_at: float
    probes: Probes = NO_PROBES  # which breakers this request is the probe of
    score: float | None = None  # the chosen replica's weighted score (None: round robin)


class Router:
    def __init__(self, config: RoutingConfig | None = None):
        self.config = config or RoutingConfig()
        self.breakers = Breakers(self.config.breakers)
        self.prefix = PrefixIndex(self.config.prefix_index_blocks)
        self.kv = KvIndex()
        self._scorers = [(SCORERS[name], weight) for name, weight in self.config.scorer_weights()]
        self._records_prefix = any(s.name in ("prefix", "precise_prefix", "cache_spread")
                                   for s, _ in self._scorers)
        self._reservations: dict[str, Reservation] = {}
        self._by_replica: dict[str, dict[str, float]] = {}  # replica → reservation → created at
        self._expiries: list[tuple[float, str]] = []  # heap of (expires at, reservation id)
        self._rotation: dict[str, int] = {}  # round robin: next position per model
        self._degraded: list[str] = []  # the last decision's fallback notes
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count()

    def _context(self, query: RouteQuery, loads: Mapping[str, LoadReport],
                 now: float) -> RoutingContext:
        return RoutingContext(
            query=query, now=now, loads=loads, breakers=self.breakers, prefix=self.prefix,
            kv=self.kv,
            load_stale_after_s=self.config.load_stale_after_s, queue_scale=self.config.queue_scale,
        )

    def unroutable(
        self, replicas: Iterable[ReplicaInfo], loads: Mapping[str, LoadReport], now: float,
    ) -> dict[str, str]:
        """For each replica no request may be routed to now, the name of the first filter it
        fails (the filters that depend on the request — model, retries — aside)."""
        ctx = self._context(RouteQuery(model="", hold_s=0.0), loads, now)
        candidates = [Candidate(r, loads.get(r.replica_id), None) for r in replicas]
        reasons: dict[str, str] = {}
        for rule in REPLICA_FILTERS:
            kept = rule.filter(ctx, candidates)
            kept_ids = {c.replica_id for c in kept}
            reasons.update((c.replica_id, rule.name) for c in candidates
                           if c.replica_id not in kept_ids)
            candidates = kept
        return reasons

    def route(
        self, query: RouteQuery, replicas: Iterable[ReplicaInfo],
        loads: Mapping[str, LoadReport], now: float,
    ) -> Reservation:
        """Reserves the best candidate for `query`; Unavailable (naming the filter that left
        none) when no replica may take it."""
        self._expire(now)
        ctx = self._context(query, loads, now)
        model = query.model
        candidates = []
        for replica in replicas:
            report = loads.get(replica.replica_id)
            candidates.append(Candidate(
                replica, report, report.models.get(model) if report is not None else None))
        for rule in FILTERS:
            candidates = rule.filter(ctx, candidates)
            if not candidates:
                raise errors.Unavailable(
                    f"no replica of {model!r} left after the filter {rule.name!r}",
                    retry_after_s=1.0,
                )
        if ctx.notes != self._degraded:  # logged when it starts and when it ends, not per route
            if ctx.notes:
                log.warning("routing_degraded", model=model, notes=ctx.notes)
            else:
                log.info("routing_recovered", model=model)
            self._degraded = ctx.notes
        chosen, score = self._pick(ctx, candidates)
        return self._reserve(query, chosen.replica, now, score)

    def release(
        self, reservation_id: str, outcome: Outcome, now: float,
        replicas: Iterable[ReplicaInfo] = (),
    ) -> Reservation | None:
        """Frees a reservation and feeds its outcome to the breakers (`replicas`: the current
        inventory, to judge the zone). None when unknown or already expired."""
        reservation = self._drop(reservation_id)
        if reservation is None:
            return None
        zone = reservation.replica.zone
        members = [r.replica_id for r in replicas if r.zone == zone] if zone else []
        self.breakers.record(reservation.replica.replica_id, zone, outcome, reservation.probes,
                             now, members)
        return reservation

    def in_flight(self) -> dict[str, int]:
        """Replica id → reservations this scheduler holds on it."""
        return {rid: len(held) for rid, held in self._by_replica.items() if held}

    def _pick(self, ctx: RoutingContext, candidates: list[Candidate]
              ) -> tuple[Candidate, float | None]:
        """The chosen candidate and its weighted score (None: round robin)."""
        if not self._scorers:  # round robin over a stable order
            candidates.sort(key=lambda c: c.replica_id)
            turn = self._rotation.get(ctx.query.model, 0)
            self._rotation[ctx.query.model] = turn + 1
            return candidates[turn % len(candidates)], None
        for c in candidates:
            report = c.report
            held = self._by_replica.get(c.replica_id)
            if held:
                # Reservations made after the report arrived are not in its figures yet.
                since = report.received_at if report is not None and c.load is not None else None
                c.pending = len(held) if since is None else _count_after(held, since)
        totals = [0.0] * len(candidates)
        for scorer, weight in self._scorers:  # clamped (llm-d clamps, so do we) as it is added
            totals = [t + weight * (0.0 if v < 0.0 else 1.0 if v > 1.0 else v)
                      for t, v in zip(totals, scorer.score(ctx, candidates), strict=True)]
        top = max(totals)
        best = min((i for i, t in enumerate(totals) if t == top),
                   key=lambda i: candidates[i].replica_id)
        return candidates[best], top

    def _reserve(self, query: RouteQuery, replica: ReplicaInfo, now: float,
                 score: float | None = None) -> Reservation:
        reservation = Reservation(
            reservation_id=f"{self._id_prefix}-{next(self._ids)}",
            replica=replica,
            model=query.model,
            prompt_tokens=query.prompt_tokens,
            created_at=now,
            expires_at=now + query.hold_s,
            probes=self.breakers.routed(replica.replica_id, replica.zone, now),
            score=score,
        )
        self._reservations[reservation.reservation_id] = reservation
        self._by_replica.setdefault(replica.replica_id, {})[reservation.reservation_id] = now
        heapq.heappush(self._expiries, (reservation.expires_at, reservation.reservation_id))
        if len(self._expiries) > 2 * len(self._reservations) + 1024:  # released ones linger
            self._expiries = [(r.expires_at, rid) for rid, r in self._reservations.items()]
            heapq.heapify(self._expiries)
        if self._records_prefix:
            self.prefix.record(query.model, query.prefix_hashes, replica.replica_id)
        return reservation

    def _drop(self, reservation_id: str) -> Reservation | None:
        reservation = self._reservations.pop(reservation_id, None)
        if reservation is not None:
            held = self._by_replica.get(reservation.replica.replica_id)
            if held is not None:
                held.pop(reservation_id, None)
                if not held:
                    del self._by_replica[reservation.replica.replica_id]
        return reservation

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, reservation_id = heapq.heappop(self._expiries)
            reservation = self._drop(reservation_id)
            if reservation is not None:  # its gateway never said how it went
                self.breakers.record(reservation.replica.replica_id, reservation.replica.zone,
                                     Outcome.UNREPORTED, reservation.probes, now, ())


def _count_after(held: dict[str, float], since: float) -> int:
    """How many reservations (insertion order = creation order) were made after `since`."""
    count = 0
    for created in reversed(held.values()):
        if created <= since:
            break
        count += 1
    return count
