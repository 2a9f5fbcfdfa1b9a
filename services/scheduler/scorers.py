"""Routing scorers: each rates every candidate in [0, 1], higher is better (llm-d's Scorer
shape). The router clamps the scores, weighs them by the policy's weights and sums them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.scheduler.candidates import Candidate, RoutingContext

UNKNOWN = 0.5  # the score of a figure the replica did not report: neither favoured nor shunned


class Scorer(Protocol):
    name: str

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        """One score per candidate, in order, each in [0, 1]."""
        ...


class KvFreeScorer:
    """The model's free share of KV-cache blocks: a fuller cache queues or evicts sooner."""

    name = "kv_free"

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        scores = []
        for c in candidates:
            fraction = c.load.kv_free_fraction if c.load is not None else None
            scores.append(UNKNOWN if fraction is None else fraction)
        return scores


class QueueScorer:
    """Requests running and waiting in the engine, plus this scheduler's reservations the load
    report does not show yet (so concurrent routes spread before the next report), as
    1 / (1 + queue / capacity): 1 when idle, 1/2 when the queue equals the engine's batch."""

    name = "queue"

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        scores = []
        for c in candidates:
            load = c.load
            queue = c.pending
            capacity = ctx.queue_scale
            if load is not None:
                queue += load.queue or 0
                capacity = load.max or capacity
            scores.append(1.0 / (1.0 + queue / capacity))
        return scores


class PrefixScorer:
    """The share of the prompt's leading blocks the replica was last routed (so likely still
    holds in its prefix cache): the longest matching leading chain over the chain's length."""

    name = "prefix"

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        hashes = ctx.query.prefix_hashes
        if not hashes:
            return [0.0] * len(candidates)
        matched = ctx.prefix.matches(ctx.query.model, hashes)
        if not matched:
            return [0.0] * len(candidates)
        total = len(hashes)
        return [matched.get(c.replica_id, 0) / total for c in candidates]


class PrecisePrefixScorer:
    """The share of the prompt's token blocks the replica's engine reports holding (the longest
    leading run), for a replica whose events flow and whose block size is the prompt's; any
    other replica gets the approximate prefix score instead: the fallback is per replica."""

    name = "precise_prefix"

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        approximate = PrefixScorer().score(ctx, candidates)
        query = ctx.query
        hashes = query.kv_block_hashes
        if not hashes:
            return approximate
        matched = ctx.kv.matches(query.model, hashes)
        total = len(hashes)
        scores = []
        for c, fallback in zip(candidates, approximate, strict=True):
            view = ctx.kv.views.get((c.replica_id, query.model))
            if view is not None and view.live and view.block_size in (0, query.kv_block_tokens):
                scores.append(matched.get(c.replica_id, 0) / total)
            else:
                scores.append(fallback)
        return scores


class CacheSpreadScorer:
    """1 for the replica holding the fewest of the model's indexed prefix blocks, 0 for the one
    holding the most: a prompt no replica has yet goes where it evicts least. The engine's free
    KV count cannot tell this, as it counts cached, unreferenced blocks as free."""

    name = "cache_spread"

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        held = ctx.prefix.held(ctx.query.model)
        counts = [held.get(c.replica_id, 0) for c in candidates] if held else []
        most = max(counts, default=0)
        if not most:
            return [1.0] * len(candidates)
        return [1.0 - count / most for count in counts]


class ZoneScorer:
    """1 for a replica in the caller's zone (no cross-zone hop, no cross-zone traffic bill)."""

    name = "zone"

    def score(self, ctx: RoutingContext, candidates: Sequence[Candidate]) -> list[float]:
        zone = ctx.query.zone
        if not zone:
            return [0.0] * len(candidates)
        return [1.0 if c.replica.zone == zone else 0.0 for c in candidates]


SCORERS: dict[str, Scorer] = {
    s.name: s for s in (KvFreeScorer(), QueueScorer(), PrefixScorer(), PrecisePrefixScorer(),
                        CacheSpreadScorer(), ZoneScorer())
}
