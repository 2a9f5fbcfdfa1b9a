"""The central side of per-tenant quotas: token buckets for requests and input/output tokens per
minute, concurrency slots, and the monthly token budget — handed out to gateways as leases.

Gateways admit requests against the chunks they hold (no network call per request) and come back
here to top up, give back what they did not use, and report what was used. Pure logic with an
injected clock: no network here.

How far over its rate a tenant can get: a bucket holds `tenancy.BURST_S` seconds of the
per-minute rate, so any 60 s window admits at most (60 + BURST_S)/60 of the rate from the
buckets, plus what gateways hold unused at the window's edges (each asks for `LEASE_FRACTION`
of a burst at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.tenancy import TenantPlan, bucket_capacity

REASONS = ("concurrency", "rpm", "input_tpm", "output_tpm", "budget", "too_large")


@dataclass(frozen=True)
class Amounts:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    slots: int = 0

    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class LeaseDecision:
    granted: Amounts
    ttl_s: float
    reason: str = ""  # set when `need` could not be met (one of REASONS)
    message: str = ""
    retry_after_s: float = 0.0


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate_per_s`.

    An amount larger than the capacity (a long prompt against a small per-minute rate) is handed
    out when the bucket is full and leaves it in debt, so it waits no longer than its share.
    """

    capacity: float
    rate_per_s: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` can be taken (after `refill`); 0 when it can."""
        missing = min(amount, self.capacity) - self.tokens
        return 0.0 if missing <= 1e-9 else missing / self.rate_per_s

    def take(self, amount: float) -> None:
        self.tokens -= amount

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + amount)

    def resize(self, per_minute: float) -> None:
        """A plan change keeps the fill ratio."""
        capacity = bucket_capacity(per_minute)
        if capacity != self.capacity:
            self.tokens = self.tokens / self.capacity * capacity
            self.capacity, self.rate_per_s = capacity, per_minute / 60.0


def _bucket(per_minute: int, now: float) -> TokenBucket:
    capacity = bucket_capacity(per_minute)
    return TokenBucket(capacity, per_minute / 60.0, capacity, now)


@dataclass
class GatewayLease:
    """What one gateway holds of one tenant's allowance."""

    expires: float
    slots: int = 0
    input_tokens: int = 0  # handed out, neither given back nor reported used yet
    output_tokens: int = 0


@dataclass
class TenantState:
    requests: TokenBucket
    input_tokens: TokenBucket
    output_tokens: TokenBucket
    leases: dict[str, GatewayLease] = field(default_factory=dict)
    budget_used: int = 0  # reported this month

    def slots_leased(self) -> int:
        return sum(lease.slots for lease in self.leases.values())

    def tokens_outstanding(self) -> int:
        return sum(lease.input_tokens + lease.output_tokens for lease in self.leases.values())


class Ledger:
    def __init__(self, ttl_s: float = 10.0) -> None:
        self.ttl_s = ttl_s
        self._tenants: dict[str, TenantState] = {}

    def lease(
        self, tenant: str, plan: TenantPlan, gateway: str, now: float,
        need: Amounts, want: Amounts, give_back: Amounts, used_input: int, used_output: int,
    ) -> LeaseDecision:
        """Settles what the gateway reports, then grants `want`, or at least `need`, of each
        resource. Nothing is granted unless all of `need` can be: a request either gets
        everything it needs to run or waits, holding nothing it cannot use."""
        state = self._state(tenant, plan, now)
        self._expire(state, now)
        lease = state.leases.setdefault(gateway, GatewayLease(now + self.ttl_s))
        self._settle(state, lease, give_back, used_input, used_output)
        lease.expires = now + self.ttl_s
        for bucket in (state.requests, state.input_tokens, state.output_tokens):
            bucket.refill(now)
        refusal = self._refusal(tenant, plan, state, need)
        if refusal is not None:
            return refusal
        granted = Amounts(
            requests=self._grant(state.requests, need.requests, want.requests),
            input_tokens=self._grant(state.input_tokens, need.input_tokens, want.input_tokens),
            output_tokens=self._grant(state.output_tokens, need.output_tokens, want.output_tokens),
            slots=max(need.slots, min(want.slots, plan.max_concurrency - state.slots_leased())),
        )
        budget = plan.monthly_token_budget
        if budget and granted.tokens() > budget - state.budget_used - state.tokens_outstanding():
            # Never hand out more than the budget has left: only what the request needs.
            granted = Amounts(granted.requests, need.input_tokens, need.output_tokens,
                              granted.slots)
        state.requests.take(granted.requests)
        state.input_tokens.take(granted.input_tokens)
        state.output_tokens.take(granted.output_tokens)
        lease.slots += granted.slots
        lease.input_tokens += granted.input_tokens
        lease.output_tokens += granted.output_tokens
        return LeaseDecision(granted, self.ttl_s)

    def _refusal(
        self, tenant: str, plan: TenantPlan, state: TenantState, need: Amounts
    ) -> LeaseDecision | None:
        def refuse(reason: str, message: str, retry_after_s: float = 0.0) -> LeaseDecision:
            return LeaseDecision(Amounts(), self.ttl_s, reason, message,
                                 math.ceil(retry_after_s * 1000) / 1000)

        if need.input_tokens > plan.input_tokens_per_minute:
            return refuse("too_large", f"the prompt's {need.input_tokens} tokens exceed the "
                          f"plan's input_tokens_per_minute ({plan.input_tokens_per_minute})")
        if need.slots and state.slots_leased() + need.slots > plan.max_concurrency:
            return refuse("concurrency", f"tenant {tenant!r} has {state.slots_leased()} requests "
                          f"in flight (max_concurrency={plan.max_concurrency})", 0.25)
        for bucket, amount, reason, limit in (
            (state.requests, need.requests, "rpm", f"{plan.requests_per_minute} requests"),
            (state.input_tokens, need.input_tokens, "input_tpm",
             f"{plan.input_tokens_per_minute} input tokens"),
            (state.output_tokens, need.output_tokens, "output_tpm",
             f"{plan.output_tokens_per_minute} output tokens"),
        ):
            wait = bucket.wait_for(amount) if amount else 0.0
            if wait > 0:
                return refuse(reason, f"tenant {tenant!r} is over {limit} per minute", wait)
        budget = plan.monthly_token_budget
        if budget and state.budget_used + state.tokens_outstanding() + need.tokens() > budget:
            return refuse("budget", f"tenant {tenant!r} has used {state.budget_used} of its "
                          f"monthly budget of {budget} tokens")
        return None

    @staticmethod
    def _grant(bucket: TokenBucket, need: int, want: int) -> int:
        """`want` if the bucket has it, else what it has (at least `need`, checked before)."""
        if want <= 0:
            return 0
        available = max(need, int(bucket.tokens))
        return max(need, min(want, available))

    @staticmethod
    def _settle(
        state: TenantState, lease: GatewayLease, give_back: Amounts, used_input: int,
        used_output: int,
    ) -> None:
        state.requests.give_back(max(0, give_back.requests))
        for name, returned, used in (("input_tokens", give_back.input_tokens, used_input),
                                     ("output_tokens", give_back.output_tokens, used_output)):
            held = getattr(lease, name)
            returned = max(0, min(returned, held))
            getattr(state, name).give_back(returned)
            setattr(lease, name, max(0, held - returned - max(0, used)))
        lease.slots = max(0, lease.slots - max(0, give_back.slots))
        state.budget_used += max(0, used_input) + max(0, used_output)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(tokens reported this month, concurrency slots leased)."""
        state = self._tenants.get(tenant)
        return (state.budget_used, state.slots_leased()) if state else (0, 0)

    def budget_used(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.budget_used if state else 0

    def tenants(self) -> list[str]:
        return list(self._tenants)

    def restore_budget(self, tenant: str, plan: TenantPlan, used: int, now: float) -> None:
        """Loads the durable month-to-date usage (on start-up, or when a tenant moves here)."""
        self._state(tenant, plan, now).budget_used = used

    def new_month(self) -> None:
        for state in self._tenants.values():
            state.budget_used = 0

    def forget(self, tenant: str) -> None:
        """The tenant moved to another replica: drop its state here."""
        self._tenants.pop(tenant, None)

    def knows(self, tenant: str) -> bool:
        return tenant in self._tenants

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
        """A lease not renewed in time (its gateway died): its slots return to the tenant; the
        tokens it held stay spent from the buckets but are not charged to the budget, since
        nobody knows what was used."""
        for gateway in [g for g, lease in state.leases.items() if lease.expires <= now]:
            del state.leases[gateway]
