"""Rollout rules (`rollout.apply_change`), the sticky canary split and shadow sampling."""

import pytest

from services.common import errors
from services.registry.rollout import (
    ClearCanary,
    ClearShadow,
    Promote,
    Rollback,
    Routing,
    SetCanary,
    SetShadow,
    apply_change,
    assignment_bucket,
    in_canary,
    shadow_sampled,
    validate_reason,
)

V1, V2, V3 = ("sha256:" + c * 64 for c in "123")


def step(routing: Routing, change) -> Routing:
    return apply_change(routing, change, "m", "ops/k1", 1000.0 + routing.revision)


def test_promote_canary_shadow_rollback_sequence():
    r = step(Routing(), Promote(V1))
    assert (r.revision, r.production, r.previous, r.updated_by) == (1, V1, "", "ops/k1")
    r = step(r, SetCanary(V2, 10))
    r = step(r, SetShadow(V3, 0.5))
    assert (r.canary, r.canary_weight_percent, r.shadow, r.shadow_rate) == (V2, 10, V3, 0.5)
    r = step(r, Promote(V2))  # promoting the canary ends the canary
    assert (r.production, r.previous, r.canary, r.shadow) == (V2, V1, "", V3)
    r = step(r, Rollback())
    assert (r.production, r.previous) == (V1, V2)
    r = step(r, Rollback())  # a second rollback undoes the first
    assert (r.production, r.previous, r.revision) == (V2, V1, 6)
    r = step(r, ClearShadow())
    assert (r.shadow, r.shadow_rate) == ("", 0.0)


@pytest.mark.parametrize(
    "routing,change,error",
    [
        (Routing(), SetCanary(V2, 10), errors.FailedPrecondition),  # no production yet
        (Routing(), SetShadow(V2, 0.1), errors.FailedPrecondition),
        (Routing(), Rollback(), errors.FailedPrecondition),  # nothing to roll back to
        (Routing(production=V1), Promote(V1), errors.FailedPrecondition),
        (Routing(production=V1), SetCanary(V1, 10), errors.FailedPrecondition),
        (Routing(production=V1), SetCanary(V2, 0), errors.InvalidArgument),
        (Routing(production=V1), SetCanary(V2, 100.5), errors.InvalidArgument),
        (Routing(production=V1), SetCanary(V2, float("nan")), errors.InvalidArgument),
        (Routing(production=V1), SetShadow(V2, 1.5), errors.InvalidArgument),
        (Routing(production=V1), ClearCanary(), errors.FailedPrecondition),
        (Routing(production=V1), ClearShadow(), errors.FailedPrecondition),
    ],
)
def test_refused_changes(routing, change, error):
    with pytest.raises(error):
        step(routing, change)


def test_rollback_clears_a_canary_or_shadow_that_becomes_production():
    r = Routing(revision=3, production=V2, previous=V1, canary=V1, canary_weight_percent=5,
                shadow=V1, shadow_rate=0.1)
    r = step(r, Rollback())
    assert (r.production, r.canary, r.shadow) == (V1, "", "")


def test_reason_is_required_and_bounded():
    with pytest.raises(errors.InvalidArgument):
        validate_reason("  ")
    with pytest.raises(errors.InvalidArgument):
        validate_reason("x" * 1025)
    assert validate_reason("bad TTFT") == "bad TTFT"


@pytest.mark.parametrize("weight", [1.0, 10.0, 37.5, 50.0, 90.0])
def test_sticky_canary_split_within_three_points(weight):
    routing = Routing(production=V1, canary=V2, canary_weight_percent=weight)
    users = [f"user-{i}" for i in range(10_000)]
    on_canary = sum(in_canary(routing, assignment_bucket("m", "acme", u)) for u in users)
    assert abs(on_canary / 100 - weight) <= 3.0


def test_canary_assignment_is_sticky_and_monotonic_in_the_weight():
    low = Routing(production=V1, canary=V2, canary_weight_percent=10)
    high = Routing(production=V1, canary=V2, canary_weight_percent=30)
    for i in range(2_000):
        bucket = assignment_bucket("m", "acme", f"user-{i}")
        assert bucket == assignment_bucket("m", "acme", f"user-{i}")  # same caller, same side
        if in_canary(low, bucket):
            assert in_canary(high, bucket)  # raising the weight never moves canary users back
    assert not in_canary(Routing(production=V1), 0)
    assert in_canary(Routing(production=V1, canary=V2, canary_weight_percent=100), 9_999)


def test_shadow_sampling_follows_the_rate_and_is_deterministic():
    routing = Routing(production=V1, shadow=V3, shadow_rate=0.25)
    sampled = sum(shadow_sampled(routing, f"req-{i}") for i in range(10_000))
    assert abs(sampled / 10_000 - 0.25) <= 0.03
    assert shadow_sampled(routing, "req-7") == shadow_sampled(routing, "req-7")
    assert not shadow_sampled(Routing(production=V1), "req-7")


def test_routing_reads_the_walking_skeleton_record():
    routing = Routing.from_record({"schema": 1, "aliases": {"production": V1, "previous": V2}})
    assert (routing.revision, routing.production, routing.previous) == (0, V1, V2)
