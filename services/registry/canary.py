"""Canary analysis: the canary version against production over a sliding window, from the
gateways' own metrics. Pure logic (no network): `auto_rollback.py` feeds it scrapes.

What counts as a bad generation is the SLO definition in `services/common/slo.py` (the alerts
use the same): eligible = every generation except the caller's own errors
(`client_error_codes`); bad = eligible and not OK. The canary breaches when, over the window and
with at least `min_requests` eligible canary generations:

    errors   its burn rate (error ratio / (1 - the model tier's availability objective)) is above
             `max_error_burn` AND its error ratio is `error_margin` above production's
    TTFT     its p95 is above production's × `max_ttft_p95_ratio` AND `min_ttft_p95_delta_s`
             slower (both arms with `min_requests` observations)
    cost     its cost per 1k tokens (the version's own prices over the tokens it served) is
             above production's × `max_cost_ratio`

Requiring both a rate and a margin keeps noise (a few errors on both sides, a handful of slow
requests) from clearing a healthy canary.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from services.common.slo import GENERATIONS_METRIC, LATENCY_HISTOGRAMS, burn_rate, error_ratio

TOKENS_METRIC = "infermesh_gateway_tokens_total"
VersionKey = tuple[str, str]  # (model, version id)


@dataclass(frozen=True)
class VersionCounts:
    """Cumulative counters of one model version (at one gateway, or a window's difference)."""

    eligible: float = 0.0
    bad: float = 0.0
    ttft_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), le ascending
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0

    @property
    def ttft_count(self) -> float:
        return self.ttft_buckets[-1][1] if self.ttft_buckets else 0.0

    def since(self, older: VersionCounts) -> VersionCounts:
        """What happened after `older`; a counter that went down means the gateway restarted,
        and then everything it counts now happened since."""
        old_buckets = dict(older.ttft_buckets)
        pairs = [(self.eligible, older.eligible), (self.bad, older.bad),
                 (self.prompt_tokens, older.prompt_tokens),
                 (self.completion_tokens, older.completion_tokens),
                 *((count, old_buckets.get(le, 0.0)) for le, count in self.ttft_buckets)]
        if any(now < before for now, before in pairs):
            return self
        return VersionCounts(
            self.eligible - older.eligible, self.bad - older.bad,
            tuple((le, count - old_buckets.get(le, 0.0)) for le, count in self.ttft_buckets),
            self.prompt_tokens - older.prompt_tokens,
            self.completion_tokens - older.completion_tokens,
        )

    def plus(self, other: VersionCounts) -> VersionCounts:
        buckets = dict(self.ttft_buckets)
        for le, count in other.ttft_buckets:
            buckets[le] = buckets.get(le, 0.0) + count
        return VersionCounts(
            self.eligible + other.eligible, self.bad + other.bad, tuple(sorted(buckets.items())),
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


def parse_gateway_metrics(
    text: str, client_error_codes: tuple[str, ...]
) -> dict[VersionKey, VersionCounts]:
    """The counters the judge needs, per (model, version), from one gateway's /metrics text."""
    eligible: dict[VersionKey, float] = collections.defaultdict(float)
    bad: dict[VersionKey, float] = collections.defaultdict(float)
    buckets: dict[VersionKey, dict[float, float]] = collections.defaultdict(dict)
    tokens: dict[tuple[VersionKey, str], float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "model" not in labels or "version" not in labels:
                continue
            key = (labels["model"], labels["version"])
            if sample.name == GENERATIONS_METRIC:
                if labels.get("code") in client_error_codes:
                    continue
                eligible[key] += sample.value
                if labels.get("code") != "OK":
                    bad[key] += sample.value
            elif sample.name == LATENCY_HISTOGRAMS["ttft"] + "_bucket":
                le = float(labels["le"])
                buckets[key][le] = buckets[key].get(le, 0.0) + sample.value
            elif sample.name == TOKENS_METRIC:
                tokens[(key, labels.get("kind", ""))] += sample.value
    keys = set(eligible) | set(buckets) | {key for key, _ in tokens}
    return {
        key: VersionCounts(eligible[key], bad[key], tuple(sorted(buckets[key].items())),
                           tokens[(key, "prompt")], tokens[(key, "completion")])
        for key in keys
    }


@dataclass
class SlidingWindow:
    """Snapshots of each gateway's cumulative counters; `delta` sums, over gateways, what
    happened in the last `window_s` seconds."""

    window_s: float
    _snapshots: dict[str, collections.deque[tuple[float, dict[VersionKey, VersionCounts]]]] = \
        field(default_factory=dict)

    def add(self, gateway: str, now: float, counts: dict[VersionKey, VersionCounts]) -> None:
        history = self._snapshots.setdefault(gateway, collections.deque())
        history.append((now, counts))
        # Keep the newest snapshot at or before the window's start as the baseline.
        while len(history) > 1 and history[1][0] <= now - self.window_s:
            history.popleft()
        for name in [g for g, h in self._snapshots.items() if h[-1][0] < now - self.window_s]:
            del self._snapshots[name]  # a gateway gone for a whole window

    def delta(self, key: VersionKey) -> VersionCounts:
        total = VersionCounts()
        for history in self._snapshots.values():
            newest = history[-1][1].get(key, VersionCounts())
            oldest = history[0][1].get(key, VersionCounts()) if len(history) > 1 else newest
            total = total.plus(newest.since(oldest))
        return total


@dataclass(frozen=True)
class CanaryPolicy:
    window_s: float = 300.0
    min_requests: int = 20
    max_error_burn: float = 14.4  # the fast page's factor in slo.PAGE_WINDOWS
    error_margin: float = 0.05
    max_ttft_p95_ratio: float = 1.5
    min_ttft_p95_delta_s: float = 0.05
    max_cost_ratio: float = 1.25


@dataclass(frozen=True)
class Prices:
    """A version's manifest prices per 1k tokens."""

    input_per_1k: float
    output_per_1k: float


def quantile(buckets: tuple[tuple[float, float], ...], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets; None without data."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


def cost_per_1k_tokens(counts: VersionCounts, prices: Prices) -> float | None:
    tokens = counts.prompt_tokens + counts.completion_tokens
    if tokens <= 0:
        return None
    cost = (counts.prompt_tokens * prices.input_per_1k
            + counts.completion_tokens * prices.output_per_1k)
    return cost / tokens


def judge(
    canary: VersionCounts, production: VersionCounts, policy: CanaryPolicy, objective: float,
    canary_prices: Prices, production_prices: Prices,
) -> str | None:
    """Why the canary must go (one line with the figures), or None while it holds up."""
    if canary.eligible < policy.min_requests:
        return None
    canary_ratio = error_ratio(canary.bad, canary.eligible) or 0.0
    production_ratio = error_ratio(production.bad, production.eligible) or 0.0
    burn = burn_rate(canary_ratio, objective)
    if burn > policy.max_error_burn and canary_ratio - production_ratio > policy.error_margin:
        return (f"error ratio {canary_ratio:.1%} over {canary.eligible:.0f} requests "
                f"(burn rate {burn:.1f} > {policy.max_error_burn:g}; production "
                f"{production_ratio:.1%})")
    if min(canary.ttft_count, production.ttft_count) >= policy.min_requests:
        canary_p95, production_p95 = quantile(canary.ttft_buckets, 0.95), \
            quantile(production.ttft_buckets, 0.95)
        if (canary_p95 is not None and production_p95 is not None
                and canary_p95 > production_p95 * policy.max_ttft_p95_ratio
                and canary_p95 - production_p95 > policy.min_ttft_p95_delta_s):
            return (f"TTFT p95 {canary_p95 * 1000:.0f} ms vs production "
                    f"{production_p95 * 1000:.0f} ms (> {policy.max_ttft_p95_ratio:g}x)")
    canary_cost = cost_per_1k_tokens(canary, canary_prices)
    production_cost = cost_per_1k_tokens(production, production_prices)
    if (canary_cost is not None and production_cost is not None
            and canary_cost > production_cost * policy.max_cost_ratio):
        return (f"cost per 1k tokens {canary_cost:.6g} vs production {production_cost:.6g} "
                f"(> {policy.max_cost_ratio:g}x)")
    return None
