"""A response cache hit's charge (`QuotaLeases.charge_request`): one request against the
tenant's requests per minute, no tokens and no concurrency slot — against the real ledger."""

from __future__ import annotations

import pytest

from infermesh.v1 import ratelimit_pb2
from services.common import errors, status
from services.common.tenancy import Tenant, TenantPlan
from services.gateway.quota import QuotaLeases
from services.ratelimit.limits import Amounts, Ledger

PLAN = TenantPlan(requests_per_minute=60, max_concurrency=1)  # a bucket of 10 requests


def _amounts(allowance: ratelimit_pb2.Allowance) -> Amounts:
    return Amounts(allowance.requests, allowance.input_tokens, allowance.output_tokens,
                   allowance.slots)


class LedgerQuota(QuotaLeases):
    """The gateway's leases, answered by the ratelimit service's ledger in-process."""

    def __init__(self) -> None:
        super().__init__({"t": Tenant("t", "t", PLAN)}, directory=None, gateway_id="g",
                         timeout_s=1.0, fail_open=False, clock=lambda: 100.0)
        self.ledger = Ledger()

    async def _call(self, tenant, request):
        decision = self.ledger.lease(
            tenant, PLAN, request.gateway_id, self._clock(), _amounts(request.need),
            _amounts(request.want), _amounts(request.give_back), request.used_input_tokens,
            request.used_output_tokens)
        granted = decision.granted
        return ratelimit_pb2.LeaseResponse(
            granted=ratelimit_pb2.Allowance(
                requests=granted.requests, input_tokens=granted.input_tokens,
                output_tokens=granted.output_tokens, slots=granted.slots),
            ttl=status.seconds_to_duration(decision.ttl_s), reason=decision.reason,
            message=decision.message)


async def test_a_hit_takes_a_request_and_no_slot_until_the_rate_is_spent():
    quota = LedgerQuota()
    await quota.acquire_slot("t", "r0", 10, 10)  # the only slot, held throughout
    for _ in range(9):  # the bucket's other nine requests
        await quota.charge_request("t")
    held = quota._held["t"]
    assert held.slots_in_use == 1 and held.requests == 0
    with pytest.raises(errors.ResourceExhausted) as refused:
        await quota.charge_request("t")
    assert refused.value.reason == "rpm"
