"""Canary analysis: parsing the gateways' metrics, the sliding window, and the judgement firing
on an injected regression and staying quiet on noise."""

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from services.registry.canary import (
    CanaryPolicy,
    Prices,
    SlidingWindow,
    VersionCounts,
    judge,
    parse_gateway_metrics,
    quantile,
)

CLIENT_ERRORS = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
PRICES = Prices(0.1, 0.2)
POLICY = CanaryPolicy(min_requests=20)
OBJECTIVE = 0.999
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def gateway_text(outcomes: dict[str, list[str]], ttft_s: dict[str, list[float]],
                 tokens: dict[str, tuple[int, int]]) -> str:
    """/metrics text with the gateway's metric names and labels."""
    registry = CollectorRegistry()
    generations = Counter("infermesh_gateway_generations_total", "", [
        "tenant", "model", "version", "finish_reason", "code"], registry=registry)
    ttft = Histogram("infermesh_gateway_ttft_seconds", "", ["model", "version"],
                     buckets=BUCKETS, registry=registry)
    served = Counter("infermesh_gateway_tokens_total", "", ["tenant", "model", "version", "kind"],
                     registry=registry)
    for version, codes in outcomes.items():
        for code in codes:
            generations.labels("t", "m", version, "stop" if code == "OK" else "error", code).inc()
    for version, values in ttft_s.items():
        for value in values:
            ttft.labels("m", version).observe(value)
    for version, (prompt, completion) in tokens.items():
        served.labels("t", "m", version, "prompt").inc(prompt)
        served.labels("t", "m", version, "completion").inc(completion)
    return generate_latest(registry).decode()


def counts(ok: int, bad: int, ttft: float = 0.05, prompt: int = 1000,
           completion: int = 1000) -> VersionCounts:
    text = gateway_text({"v": ["OK"] * ok + ["UNAVAILABLE"] * bad},
                        {"v": [ttft] * (ok + bad)}, {"v": (prompt, completion)})
    return parse_gateway_metrics(text, CLIENT_ERRORS)[("m", "v")]


def test_parse_counts_eligible_bad_buckets_and_tokens():
    text = gateway_text(
        {"a": ["OK"] * 7 + ["UNAVAILABLE"] * 2 + ["INVALID_ARGUMENT"] * 5, "b": ["OK"]},
        {"a": [0.02, 0.2, 3.0]}, {"a": (100, 40)})
    parsed = parse_gateway_metrics(text, CLIENT_ERRORS)
    a = parsed[("m", "a")]
    assert (a.eligible, a.bad) == (9, 2)  # the callers' own errors are not the version's
    assert (a.prompt_tokens, a.completion_tokens, a.ttft_count) == (100, 40, 3)
    assert dict(a.ttft_buckets)[0.025] == 1 and dict(a.ttft_buckets)[float("inf")] == 3
    assert parsed[("m", "b")].eligible == 1


def test_sliding_window_sums_gateways_and_survives_a_restart():
    window = SlidingWindow(window_s=60)
    key = ("m", "v")
    window.add("g1", 0, {key: VersionCounts(eligible=100, bad=1)})
    window.add("g2", 0, {key: VersionCounts(eligible=50)})
    window.add("g1", 30, {key: VersionCounts(eligible=130, bad=4)})
    window.add("g2", 30, {key: VersionCounts(eligible=5)})  # restarted: 5 since then
    delta = window.delta(key)
    assert (delta.eligible, delta.bad) == (35, 3)
    window.add("g1", 100, {key: VersionCounts(eligible=200, bad=4)})  # g2 gone for a window
    assert window.delta(key).eligible == 70  # since t=30, the newest baseline in the window


def test_quantile_interpolates_like_prometheus():
    buckets = ((0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (float("inf"), 100.0))
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.95) == pytest.approx(0.35)
    assert quantile((), 0.95) is None
    assert quantile(((0.1, 0.0), (float("inf"), 10.0)), 0.95) == 0.1


def test_fires_on_an_injected_error_rate():
    reason = judge(counts(ok=60, bad=40), counts(ok=1000, bad=1), POLICY, OBJECTIVE, PRICES,
                   PRICES)
    assert reason is not None and "error ratio 40.0%" in reason


def test_quiet_on_noise():
    rng = random.Random(7)
    for _ in range(100):  # the same 1 % error rate on both sides, small samples
        bad = sum(rng.random() < 0.01 for _ in range(40))
        production_bad = sum(rng.random() < 0.01 for _ in range(400))
        canary = counts(ok=40 - bad, bad=bad)
        assert judge(canary, counts(ok=400 - production_bad, bad=production_bad), POLICY,
                     OBJECTIVE, PRICES, PRICES) is None
    # Too few requests to judge, however bad they look.
    assert judge(counts(ok=5, bad=10), counts(ok=100, bad=0), POLICY, OBJECTIVE, PRICES,
                 PRICES) is None
    # Slower, but within the ratio or the absolute margin.
    assert judge(counts(ok=50, bad=0, ttft=0.06), counts(ok=50, bad=0, ttft=0.05), POLICY,
                 OBJECTIVE, PRICES, PRICES) is None
    assert judge(counts(ok=50, bad=0, ttft=0.02), counts(ok=50, bad=0, ttft=0.005), POLICY,
                 OBJECTIVE, PRICES, PRICES) is None


def test_fires_on_a_ttft_regression_and_on_cost():
    slow = judge(counts(ok=50, bad=0, ttft=0.8), counts(ok=50, bad=0, ttft=0.05), POLICY,
                 OBJECTIVE, PRICES, PRICES)
    assert slow is not None and slow.startswith("TTFT p95")
    verbose = judge(counts(ok=50, bad=0, prompt=100, completion=5000), counts(ok=50, bad=0),
                    POLICY, OBJECTIVE, PRICES, PRICES)
    assert verbose is not None and verbose.startswith("cost per 1k tokens")
    pricier = judge(counts(ok=50, bad=0), counts(ok=50, bad=0), POLICY, OBJECTIVE,
                    Prices(0.2, 0.4), PRICES)
    assert pricier is not None


def test_a_canary_that_failed_to_load_and_is_served_nowhere_is_unloadable():
    from services.common.records import ReplicaRecord
    from services.registry.auto_rollback import unloadable

    def replica(rid: str, models=(), errors=None) -> ReplicaRecord:
        return ReplicaRecord(rid, f"{rid}:1", models=frozenset(models),
                             placement_errors=errors or {})

    failed = replica("r2", errors={"m-canary": "load failed: bad weights"})
    assert unloadable("m-canary", [replica("r1"), failed]) == (
        "its engine failed to load on r2: load failed: bad weights")
    assert unloadable("m-canary", [replica("r1")]) is None  # still loading: not judged yet
