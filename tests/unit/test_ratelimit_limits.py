from services.common.tenancy import TenantPlan
from services.ratelimit.limits import Amounts, Ledger

NONE = Amounts()
PLAN = TenantPlan(requests_per_minute=600, input_tokens_per_minute=6000,
                  output_tokens_per_minute=6000, max_concurrency=4)


def lease(ledger, gateway="g1", now=0.0, need=NONE, want=None, give_back=NONE, used=(0, 0),
          plan=PLAN, tenant="t"):
    return ledger.lease(tenant, plan, gateway, now, need, want or need, give_back, *used)


def test_grants_what_is_wanted_when_the_buckets_have_it():
    decision = lease(Ledger(), need=Amounts(1, 10, 20, 1), want=Amounts(25, 250, 250, 1))
    assert not decision.reason
    assert decision.granted == Amounts(25, 250, 250, 1)


def test_partial_grant_when_only_the_need_fits():
    ledger = Ledger()  # bursts: 100 requests, 1000 tokens each way
    lease(ledger, need=Amounts(0, 0, 900, 0))
    decision = lease(ledger, need=Amounts(0, 0, 50, 0), want=Amounts(0, 0, 500, 0))
    assert decision.granted.output_tokens == 100  # all that is left, at least the need


def test_refusal_names_the_limit_and_when_to_retry():
    ledger = Ledger()
    lease(ledger, need=Amounts(0, 0, 1000, 0))  # the whole output burst
    decision = lease(ledger, need=Amounts(1, 10, 100, 1))
    assert decision.reason == "output_tpm" and decision.granted == NONE
    assert abs(decision.retry_after_s - 1.0) < 0.01  # 100 tokens at 100/s
    assert not lease(ledger, now=1.0, need=Amounts(1, 10, 100, 1)).reason


def test_a_request_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_debt():
    plan = TenantPlan(input_tokens_per_minute=600, output_tokens_per_minute=60)  # burst 10
    ledger = Ledger()
    assert lease(ledger, plan=plan, need=Amounts(0, 0, 40, 0)).granted.output_tokens == 40
    refused = lease(ledger, plan=plan, need=Amounts(0, 0, 5, 0))
    assert refused.reason == "output_tpm" and abs(refused.retry_after_s - 35.0) < 0.01
    assert not lease(ledger, plan=plan, now=35.0, need=Amounts(0, 0, 5, 0)).reason


def test_concurrency_is_shared_by_every_gateway_and_returns_when_a_lease_lapses():
    ledger = Ledger(ttl_s=10)
    assert lease(ledger, "g1", need=Amounts(slots=3)).granted.slots == 3
    refused = lease(ledger, "g2", need=Amounts(slots=2))
    assert refused.reason == "concurrency" and "max_concurrency=4" in refused.message
    assert lease(ledger, "g2", need=Amounts(slots=1)).granted.slots == 1
    # g1 gives one back; g2 can take it.
    lease(ledger, "g1", give_back=Amounts(slots=1))
    assert lease(ledger, "g2", need=Amounts(slots=1)).granted.slots == 1
    # g1 dies (stops renewing): after the TTL its two slots are free again.
    assert lease(ledger, "g2", now=9.0, need=Amounts(slots=1)).reason == "concurrency"
    lease(ledger, "g2", now=9.0)  # g2 renews
    assert lease(ledger, "g2", now=10.5, need=Amounts(slots=2)).granted.slots == 2


def test_given_back_allowance_is_refunded_and_usage_is_charged():
    ledger = Ledger()
    lease(ledger, need=Amounts(0, 0, 1000, 0))
    assert lease(ledger, need=Amounts(0, 0, 500, 0)).reason == "output_tpm"
    lease(ledger, give_back=Amounts(0, 0, 600, 0), used=(30, 400))
    assert lease(ledger, need=Amounts(0, 0, 500, 0)).granted.output_tokens == 500
    assert ledger.usage("t") == (430, 0)


def test_monthly_budget_counts_what_is_held_and_used():
    plan = TenantPlan(monthly_token_budget=100, max_concurrency=4)
    ledger = Ledger()
    decision = lease(ledger, plan=plan, need=Amounts(1, 10, 20, 1), want=Amounts(1, 10, 500, 1))
    assert decision.granted.output_tokens == 20  # never more than the budget has left
    lease(ledger, plan=plan, used=(10, 20), give_back=Amounts(slots=1))
    assert not lease(ledger, plan=plan, need=Amounts(1, 10, 50, 1)).reason
    refused = lease(ledger, plan=plan, need=Amounts(1, 10, 20, 1))
    assert refused.reason == "budget" and "monthly budget of 100" in refused.message


def test_prompt_larger_than_the_plan_is_refused_without_retry():
    plan = TenantPlan(input_tokens_per_minute=100)
    refused = lease(Ledger(), plan=plan, need=Amounts(1, 101, 1, 1))
    assert refused.reason == "too_large" and refused.retry_after_s == 0


def test_tenants_are_independent_and_budgets_restore():
    ledger = Ledger()
    lease(ledger, tenant="a", need=Amounts(0, 0, 1000, 0))
    assert lease(ledger, tenant="a", need=Amounts(0, 0, 10, 0)).reason
    assert not lease(ledger, tenant="b", need=Amounts(0, 0, 10, 0)).reason
    ledger.restore_budget("c", PLAN, 1234, 0.0)
    assert ledger.usage("c") == (1234, 0)
    ledger.new_month()
    assert ledger.usage("c") == (0, 0)
