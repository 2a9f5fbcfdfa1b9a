from services.common.tenancy import TenantPlan
from services.ratelimit.limits import Limiter


def test_concurrency_slots_are_bounded_and_released():
    limiter = Limiter()
    plan = TenantPlan(requests_per_minute=600, max_concurrency=2)
    a = limiter.acquire("t", plan, now=0.0, hold_s=60)
    b = limiter.acquire("t", plan, now=0.0, hold_s=60)
    refused = limiter.acquire("t", plan, now=0.0, hold_s=60)
    assert a.allowed and b.allowed and not refused.allowed
    assert refused.reason == "concurrency" and refused.retry_after_s > 0
    assert "max_concurrency=2" in refused.message
    assert limiter.release("t", a.slot_id)
    assert not limiter.release("t", a.slot_id)  # idempotent
    assert limiter.acquire("t", plan, now=0.0, hold_s=60).allowed


def test_expired_slots_do_not_leak():
    limiter = Limiter()
    plan = TenantPlan(requests_per_minute=600, max_concurrency=1)
    assert limiter.acquire("t", plan, now=0.0, hold_s=5).allowed
    assert not limiter.acquire("t", plan, now=4.9, hold_s=5).allowed
    assert limiter.acquire("t", plan, now=5.0, hold_s=5).allowed


def test_rpm_bucket_refuses_with_retry_delay_and_refills():
    limiter = Limiter()
    plan = TenantPlan(requests_per_minute=2, max_concurrency=100)
    assert limiter.acquire("t", plan, 0.0, 1).allowed
    assert limiter.acquire("t", plan, 0.0, 1).allowed
    refused = limiter.acquire("t", plan, 0.0, 1)
    assert not refused.allowed and refused.reason == "rpm"
    assert 29 <= refused.retry_after_s <= 30.001
    assert limiter.acquire("t", plan, 30.0, 1).allowed


def test_tenants_are_independent():
    limiter = Limiter()
    plan = TenantPlan(requests_per_minute=1, max_concurrency=1)
    assert limiter.acquire("a", plan, 0.0, 1).allowed
    assert not limiter.acquire("a", plan, 0.0, 1).allowed
    assert limiter.acquire("b", plan, 0.0, 1).allowed
