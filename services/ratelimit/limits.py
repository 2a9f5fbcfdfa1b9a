"""Per-tenant admission: a requests-per-minute token bucket and leased concurrency slots.

Pure logic with an injected clock, so it is tested without a network. A slot is held until it is
released or its hold expires; expiry is what keeps a crashed gateway from leaking slots.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from services.common.tenancy import TenantPlan


@dataclass(frozen=True)
class Decision:
    allowed: bool
    slot_id: str = ""
    reason: str = ""  # "rpm" | "concurrency" when refused
    message: str = ""
    retry_after_s: float = 0.0


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate_per_s`."""

    capacity: float
    rate_per_s: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Takes one token; returns 0 on success, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass
class TenantState:
    bucket: TokenBucket
    slots: dict[str, float] = field(default_factory=dict)  # slot id → expiry time


class Limiter:
    def __init__(self) -> None:
        self._tenants: dict[str, TenantState] = {}

    def acquire(self, tenant: str, plan: TenantPlan, now: float, hold_s: float) -> Decision:
        state = self._state(tenant, plan, now)
        self._expire(state, now)
        if len(state.slots) >= plan.max_concurrency:
            soonest = min(state.slots.values())
            return Decision(
                False,
                reason="concurrency",
                message=f"tenant {tenant!r} already has {len(state.slots)} requests in flight "
                f"(max_concurrency={plan.max_concurrency})",
                retry_after_s=max(0.05, min(1.0, soonest - now)),
            )
        wait = state.bucket.take(now)
        if wait > 0:
            return Decision(
                False,
                reason="rpm",
                message=f"tenant {tenant!r} is over {plan.requests_per_minute} requests per minute",
                retry_after_s=math.ceil(wait * 1000) / 1000,
            )
        slot_id = uuid.uuid4().hex
        state.slots[slot_id] = now + hold_s
        return Decision(True, slot_id=slot_id)

    def release(self, tenant: str, slot_id: str) -> bool:
        state = self._tenants.get(tenant)
        return state is not None and state.slots.pop(slot_id, None) is not None

    def in_flight(self, tenant: str, now: float) -> int:
        state = self._tenants.get(tenant)
        if state is None:
            return 0
        self._expire(state, now)
        return len(state.slots)

    def _state(self, tenant: str, plan: TenantPlan, now: float) -> TenantState:
        rpm = float(plan.requests_per_minute)
        state = self._tenants.get(tenant)
        if state is None:
            state = TenantState(TokenBucket(rpm, rpm / 60.0, rpm, now))
            self._tenants[tenant] = state
        elif state.bucket.capacity != rpm:  # the plan changed: keep the fill ratio
            ratio = state.bucket.tokens / state.bucket.capacity
            state.bucket.capacity, state.bucket.rate_per_s = rpm, rpm / 60.0
            state.bucket.tokens = ratio * rpm
        return state

    @staticmethod
    def _expire(state: TenantState, now: float) -> None:
        for slot_id in [s for s, expiry in state.slots.items() if expiry <= now]:
            del state.slots[slot_id]
