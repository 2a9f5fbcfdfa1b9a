"""Per-tenant admission: requests-per-minute and input/output tokens-per-minute token buckets,
leased concurrency slots, and a monthly token budget.

Admission *reserves*: one request, the prompt's tokens and max_tokens output tokens, and a slot.
Settling a slot *commits* what the generation really used and refunds the rest to the buckets,
so a cancelled or failed request pays only for what it consumed. Pure logic with an injected
clock: no network here.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from services.common.tenancy import TenantPlan

REASONS = ("concurrency", "rpm", "input_tpm", "output_tpm", "budget", "too_large")
# A bucket holds this many seconds' worth of its per-minute rate: a tenant may burst that much,
# so any 60 s window admits at most (60 + BURST_S) / 60 of the configured rate.
BURST_S = 10.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    slot_id: str = ""
    reason: str = ""  # one of REASONS when refused
    message: str = ""
    retry_after_s: float = 0.0
    max_tokens: int = 0  # output tokens granted: max_tokens, or the plan's degraded cap


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate_per_s`.

    A request larger than the capacity (a long prompt against a small per-minute rate) is let
    through when the bucket is full and leaves it in debt, so it waits no longer than its share.
    """

    capacity: float
    rate_per_s: float
    tokens: float
    updated: float

    def refill(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        return self.tokens

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (after `refill`); 0 when it is."""
        missing = min(amount, self.capacity) - self.tokens
        return 0.0 if missing <= 1e-9 else missing / self.rate_per_s

    def take(self, amount: float) -> None:
        self.tokens -= amount

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + amount)

    def resize(self, per_minute: float) -> None:
        """A plan change keeps the fill ratio."""
        capacity = _capacity(per_minute)
        if capacity != self.capacity:
            self.tokens = self.tokens / self.capacity * capacity
            self.capacity, self.rate_per_s = capacity, per_minute / 60.0


@dataclass
class Slot:
    expires: float
    input_tokens: int
    output_tokens: int


@dataclass
class TenantState:
    requests: TokenBucket
    input_tokens: TokenBucket
    output_tokens: TokenBucket
    slots: dict[str, Slot] = field(default_factory=dict)
    budget_used: int = 0  # committed tokens this month

    def reserved_tokens(self) -> int:
        return sum(s.input_tokens + s.output_tokens for s in self.slots.values())


def _capacity(per_minute: float) -> float:
    return max(1.0, per_minute * BURST_S / 60.0)


def _bucket(per_minute: int, now: float) -> TokenBucket:
    capacity = _capacity(per_minute)
    return TokenBucket(capacity, per_minute / 60.0, capacity, now)


class Limiter:
    def __init__(self) -> None:
        self._tenants: dict[str, TenantState] = {}

    def acquire(
        self, tenant: str, plan: TenantPlan, now: float, hold_s: float,
        input_tokens: int, output_tokens: int,
    ) -> Decision:
        """All or nothing: either every limit has room and all are taken, or none is."""
        state = self._state(tenant, plan, now)
        self._expire(state, now)
        for bucket in (state.requests, state.input_tokens, state.output_tokens):
            bucket.refill(now)
        if len(state.slots) >= plan.max_concurrency:
            soonest = min(s.expires for s in state.slots.values())
            return Decision(
                False, reason="concurrency", retry_after_s=max(0.05, min(1.0, soonest - now)),
                message=f"tenant {tenant!r} has {len(state.slots)} requests in flight "
                        f"(max_concurrency={plan.max_concurrency})")
        if input_tokens > plan.input_tokens_per_minute:
            return Decision(False, reason="too_large",
                            message=f"the prompt's {input_tokens} tokens exceed the plan's "
                                    f"input_tokens_per_minute ({plan.input_tokens_per_minute})")
        granted = self._grantable_output(state, plan, output_tokens)
        for bucket, amount, reason, limit in (
            (state.requests, 1, "rpm", f"{plan.requests_per_minute} requests per minute"),
            (state.input_tokens, input_tokens, "input_tpm",
             f"{plan.input_tokens_per_minute} input tokens per minute"),
            (state.output_tokens, granted, "output_tpm",
             f"{plan.output_tokens_per_minute} output tokens per minute"),
        ):
            wait = bucket.wait_for(amount)
            if wait > 0:
                return Decision(False, reason=reason, retry_after_s=math.ceil(wait * 1000) / 1000,
                                message=f"tenant {tenant!r} is over {limit}")
        budget = plan.monthly_token_budget
        if budget and state.budget_used + state.reserved_tokens() + input_tokens + granted > budget:
            return Decision(False, reason="budget",
                            message=f"tenant {tenant!r} has used {state.budget_used} of its "
                                    f"monthly budget of {budget} tokens")
        state.requests.take(1)
        state.input_tokens.take(input_tokens)
        state.output_tokens.take(granted)
        slot_id = uuid.uuid4().hex
        state.slots[slot_id] = Slot(now + hold_s, input_tokens, granted)
        return Decision(True, slot_id=slot_id, max_tokens=granted)

    def settle(self, tenant: str, slot_id: str, input_used: int, output_used: int) -> bool:
        """Commits what the request used, refunds the rest; False if the slot was gone."""
        state = self._tenants.get(tenant)
        slot = state.slots.pop(slot_id, None) if state else None
        if state is None or slot is None:
            return False
        input_used, output_used = max(0, input_used), max(0, min(output_used, slot.output_tokens))
        if input_used <= slot.input_tokens:
            state.input_tokens.give_back(slot.input_tokens - input_used)
        else:  # the gateway's estimate was low: the engine's count is what is charged
            state.input_tokens.take(input_used - slot.input_tokens)
        state.output_tokens.give_back(slot.output_tokens - output_used)
        state.budget_used += input_used + output_used
        return True

    def in_flight(self, tenant: str, now: float) -> int:
        state = self._tenants.get(tenant)
        if state is None:
            return 0
        self._expire(state, now)
        return len(state.slots)

    def budget_used(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.budget_used if state else 0

    def restore_budget(self, tenant: str, plan: TenantPlan, used: int, now: float) -> None:
        """Loads the durable month-to-date usage (on start-up or a new month)."""
        self._state(tenant, plan, now).budget_used = used

    def new_month(self) -> None:
        for state in self._tenants.values():
            state.budget_used = 0

    @staticmethod
    def _grantable_output(state: TenantState, plan: TenantPlan, wanted: int) -> int:
        """`wanted`, or the plan's degraded cap when the output bucket cannot cover `wanted`."""
        cap = plan.degraded_max_tokens
        if cap and wanted > cap and state.output_tokens.tokens < wanted:
            return cap
        return wanted

    def _state(self, tenant: str, plan: TenantPlan, now: float) -> TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = TenantState(_bucket(plan.requests_per_minute, now),
                                _bucket(plan.input_tokens_per_minute, now),
                                _bucket(plan.output_tokens_per_minute, now))
            self._tenants[tenant] = state
        else:
            state.requests.resize(plan.requests_per_minute)
            state.input_tokens.resize(plan.input_tokens_per_minute)
            state.output_tokens.resize(plan.output_tokens_per_minute)
        return state

    @staticmethod
    def _expire(state: TenantState, now: float) -> None:
        """A slot whose hold ran out (its gateway died): its reserved tokens stay spent from the
        buckets, but nothing is charged to the budget, since nobody knows what it used."""
        for slot_id in [s for s, slot in state.slots.items() if slot.expires <= now]:
            del state.slots[slot_id]
