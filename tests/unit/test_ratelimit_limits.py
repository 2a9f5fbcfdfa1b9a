from services.common.tenancy import TenantPlan
from services.ratelimit.limits import Limiter

BIG = dict(requests_per_minute=600, input_tokens_per_minute=10_000, output_tokens_per_minute=10_000)


def test_concurrency_slots_are_bounded_and_released():
    limiter = Limiter()
    plan = TenantPlan(max_concurrency=2, **BIG)
    a = limiter.acquire("t", plan, 0.0, 60, 10, 10)
    b = limiter.acquire("t", plan, 0.0, 60, 10, 10)
    refused = limiter.acquire("t", plan, 0.0, 60, 10, 10)
    assert a.allowed and b.allowed and not refused.allowed
    assert refused.reason == "concurrency" and refused.retry_after_s > 0
    assert "max_concurrency=2" in refused.message
    assert limiter.settle("t", a.slot_id, 10, 10)
    assert not limiter.settle("t", a.slot_id, 10, 10)  # idempotent
    assert limiter.acquire("t", plan, 0.0, 60, 10, 10).allowed


def test_expired_slots_do_not_leak():
    limiter = Limiter()
    plan = TenantPlan(max_concurrency=1, **BIG)
    assert limiter.acquire("t", plan, 0.0, 5, 1, 1).allowed
    assert not limiter.acquire("t", plan, 4.9, 5, 1, 1).allowed
    assert limiter.acquire("t", plan, 5.0, 5, 1, 1).allowed


def test_rpm_bucket_bursts_ten_seconds_worth_then_refills():
    limiter = Limiter()
    plan = TenantPlan(requests_per_minute=60, max_concurrency=100,
                      input_tokens_per_minute=1000, output_tokens_per_minute=1000)
    for _ in range(10):  # a 10 s burst of a 60/min plan
        decision = limiter.acquire("t", plan, 0.0, 1, 1, 1)
        assert decision.allowed
        limiter.settle("t", decision.slot_id, 1, 1)
    refused = limiter.acquire("t", plan, 0.0, 1, 1, 1)
    assert not refused.allowed and refused.reason == "rpm"
    assert 0.99 <= refused.retry_after_s <= 1.001
    assert limiter.acquire("t", plan, 1.0, 1, 1, 1).allowed


def test_a_request_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_debt():
    limiter = Limiter()
    plan = TenantPlan(max_concurrency=10, input_tokens_per_minute=600,
                      output_tokens_per_minute=60)  # burst 10 output tokens, 1 per second
    grant = limiter.acquire("t", plan, 0.0, 60, 1, 40)
    assert grant.allowed and grant.max_tokens == 40
    limiter.settle("t", grant.slot_id, 1, 40)
    refused = limiter.acquire("t", plan, 0.0, 60, 1, 5)
    assert refused.reason == "output_tpm" and abs(refused.retry_after_s - 35.0) < 0.01
    assert limiter.acquire("t", plan, 35.0, 60, 1, 5).allowed


def test_reserve_commit_refund_arithmetic():
    limiter = Limiter()
    plan = TenantPlan(max_concurrency=10, requests_per_minute=100,
                      input_tokens_per_minute=600, output_tokens_per_minute=600)
    grant = limiter.acquire("t", plan, 0.0, 60, input_tokens=30, output_tokens=60)
    assert grant.allowed and grant.max_tokens == 60
    # 40 of the 100-token burst left: a request wanting 50 waits for 10 (1 s at 600/min).
    refused = limiter.acquire("t", plan, 0.0, 60, 10, 50)
    assert refused.reason == "output_tpm" and abs(refused.retry_after_s - 1.0) < 0.01
    # The first request used only 20 output tokens: 40 come back at once.
    assert limiter.settle("t", grant.slot_id, input_used=30, output_used=20)
    assert limiter.acquire("t", plan, 0.0, 60, 10, 50).allowed
    assert limiter.budget_used("t") == 50


def test_cancelled_request_refunds_everything_unused():
    limiter = Limiter()
    plan = TenantPlan(max_concurrency=10, requests_per_minute=100,
                      input_tokens_per_minute=600, output_tokens_per_minute=600)
    grant = limiter.acquire("t", plan, 0.0, 60, 50, 100)
    limiter.settle("t", grant.slot_id, input_used=0, output_used=0)  # cancelled before the engine
    assert limiter.acquire("t", plan, 0.0, 60, 100, 100).allowed
    assert limiter.budget_used("t") == 0


def test_prompt_larger_than_the_plan_is_refused_without_retry():
    limiter = Limiter()
    plan = TenantPlan(input_tokens_per_minute=100, output_tokens_per_minute=100)
    refused = limiter.acquire("t", plan, 0.0, 60, 101, 1)
    assert refused.reason == "too_large" and refused.retry_after_s == 0


def test_monthly_budget_counts_reservations_and_commits():
    limiter = Limiter()
    plan = TenantPlan(monthly_token_budget=100, **BIG)
    grant = limiter.acquire("t", plan, 0.0, 60, 40, 40)
    assert not limiter.acquire("t", plan, 0.0, 60, 10, 20).allowed  # 80 reserved + 30 > 100
    limiter.settle("t", grant.slot_id, 40, 10)
    assert limiter.acquire("t", plan, 0.0, 60, 10, 20).allowed  # 50 used + 30 <= 100
    refused = limiter.acquire("t", plan, 0.0, 60, 10, 20)
    assert refused.reason == "budget" and "monthly budget of 100" in refused.message


def test_degradation_caps_max_tokens_before_refusing():
    limiter = Limiter()
    plan = TenantPlan(max_concurrency=10, requests_per_minute=100, input_tokens_per_minute=6000,
                      output_tokens_per_minute=600, max_output_tokens=100, degraded_max_tokens=16)
    first = limiter.acquire("t", plan, 0.0, 60, 1, 90)
    assert first.allowed and first.max_tokens == 90
    degraded = limiter.acquire("t", plan, 0.0, 60, 1, 90)
    assert not degraded.allowed  # 10 left: not even the degraded 16 fit
    limiter.settle("t", first.slot_id, 1, 80)  # 10 refunded → 20 left
    degraded = limiter.acquire("t", plan, 0.0, 60, 1, 90)
    assert degraded.allowed and degraded.max_tokens == 16


def test_tenants_are_independent():
    limiter = Limiter()
    plan = TenantPlan(requests_per_minute=6, max_concurrency=1)
    assert limiter.acquire("a", plan, 0.0, 1, 1, 1).allowed
    assert not limiter.acquire("a", plan, 0.0, 1, 1, 1).allowed
    assert limiter.acquire("b", plan, 0.0, 1, 1, 1).allowed
