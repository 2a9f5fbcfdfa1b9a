"""Routing filters: each keeps the candidates that may take the request (llm-d's Filter shape).

They run in `FILTERS` order; the first that leaves none names the reason in the Unavailable.
"""

from __future__ import annotations

from typing import Protocol

from services.scheduler.candidates import Candidate, RoutingContext


class Filter(Protocol):
    name: str

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates that pass, in the order given."""
        ...


class ServesModel:
    """The replica has the model loaded and ready."""

    name = "serves the model"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        model = ctx.query.model
        return [c for c in candidates if model in c.replica.models]


class Healthy:
    """Its sidecar says Triton is ready."""

    name = "healthy"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.replica.healthy]


class NotDraining:
    """A draining replica finishes what it has and takes nothing new."""

    name = "not draining"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if not c.replica.draining]


class NotExcluded:
    """Not a replica that already failed this request (a retry goes elsewhere)."""

    name = "not already tried"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        exclude = ctx.query.exclude
        return [c for c in candidates if c.replica_id not in exclude] if exclude else candidates


class FreshLoad:
    """The replica's load report is recent: a silent sidecar means a hung or dead replica,
    dropped well before its lease expires. A replica that never reported is kept (load unknown).

    Static stability: when *no* report anywhere is fresh, the feed is what broke (etcd away, the
    watch down), not every replica, so all are kept rather than refusing every request.
    """

    name = "load report fresh"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        horizon = ctx.now - ctx.load_stale_after_s
        kept = [c for c in candidates if c.report is None or c.report.received_at >= horizon]
        if kept or not ctx.loads:
            return kept
        if max(r.received_at for r in ctx.loads.values()) < horizon:
            ctx.notes.append("every load report is stale: routing on replica records alone")
            return candidates
        return kept


class BreakerClosed:
    """Neither the replica's nor its zone's circuit breaker is open (half-open lets one probe)."""

    name = "circuit breaker not open"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        breakers = ctx.breakers
        if not breakers.replicas_not_closed and not breakers.zones_not_closed:
            return candidates
        available, now = breakers.available, ctx.now
        return [c for c in candidates if available(c.replica_id, c.replica.zone, now)]


# Cheapest and most selective first: most replicas fail "serves the model" in a big fleet.
FILTERS: tuple[Filter, ...] = (
    ServesModel(), Healthy(), NotDraining(), NotExcluded(), FreshLoad(), BreakerClosed(),
)
# The filters that judge a replica whatever the request: why an operator sees it get no traffic.
REPLICA_FILTERS: tuple[Filter, ...] = tuple(
    f for f in FILTERS if not isinstance(f, (ServesModel, NotExcluded)))
