"""How many replicas a model needs: the sizing arithmetic and the autoscaling signal.

Pure logic with an injected clock. `size_replicas` is the one sizing function: the scheduler's
autoscaler runs it on measured token demand and `meshctl capacity plan` runs it on a traffic
profile, so a capacity review and the live signal can never disagree on the arithmetic.

    prefill replicas = prefill tokens/s ÷ one replica's prefill tokens/s
    decode replicas  = decode tokens/s  ÷ one replica's decode tokens/s
    needed           = the larger of the two (the bound), × (1 + headroom), rounded up
    zone survival    = needed × z ÷ (z − 1), rounded up (z ≥ 2 zones): losing the fullest zone
                       of an even spread still leaves `needed`
    replicas         = at least `min_copies`

`Autoscaler` turns the sizing into a signal that moves fast up and slowly down: it scales out at
once on the short window's demand, and scales in only to what the long window also allows, and
only after a cool-down since the last change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

# Float sums such as 0.1 × 30 land a hair above an integer; that must not cost a whole replica.
ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class TokenRates:
    """Token demand (or one replica's capacity), split by the two phases that bound a GPU."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Sizing:
    """Each step of the arithmetic, so that a reader can check it (see `meshctl capacity`)."""

    demand: TokenRates
    capacity: TokenRates  # of one replica
    prefill_replicas: float  # exact, before rounding
    decode_replicas: float
    bound: str  # "prefill" | "decode": the phase that needs more replicas
    headroom: float
    with_headroom: int  # the bound × (1 + headroom), rounded up
    zones: int
    zone_survival: int  # with_headroom × z / (z − 1), rounded up; with_headroom when z = 1
    min_copies: int
    replicas: int  # the answer


def _round_up(value: float) -> int:
    return max(0, math.ceil(value - ROUNDING_SLACK))


def survive_zone_loss(replicas: int, zones: int) -> int:
    """The smallest fleet that, spread evenly over `zones`, keeps `replicas` after losing one."""
    if zones <= 1 or replicas == 0:
        return replicas
    return _round_up(replicas * zones / (zones - 1))


def size_replicas(
    demand: TokenRates, capacity: TokenRates, *, headroom: float, zones: int, min_copies: int
) -> Sizing:
    """Replicas for `demand` when one replica serves `capacity` (see the module docstring)."""
    if capacity.prefill_tokens_per_s <= 0 or capacity.decode_tokens_per_s <= 0:
        raise ValueError("capacity: prefill and decode tokens/s must be > 0")
    if demand.prefill_tokens_per_s < 0 or demand.decode_tokens_per_s < 0:
        raise ValueError("demand: tokens/s must be >= 0")
    if headroom < 0:
        raise ValueError("headroom: must be >= 0")
    if zones < 1:
        raise ValueError("zones: must be >= 1")
    if min_copies < 0:
        raise ValueError("min_copies: must be >= 0")
    prefill = demand.prefill_tokens_per_s / capacity.prefill_tokens_per_s
    decode = demand.decode_tokens_per_s / capacity.decode_tokens_per_s
    bound = "prefill" if prefill > decode else "decode"
    with_headroom = _round_up(max(prefill, decode) * (1 + headroom))
    zone_survival = survive_zone_loss(with_headroom, zones)
    return Sizing(
        demand=demand, capacity=capacity, prefill_replicas=prefill, decode_replicas=decode,
        bound=bound, headroom=headroom, with_headroom=with_headroom, zones=zones,
        zone_survival=zone_survival, min_copies=min_copies,
        replicas=max(min_copies, zone_survival),
    )


@dataclass(frozen=True)
class ScalePolicy:
    headroom: float = 0.2
    zones: int = 1
    min_copies: int = 1
    scale_in_cooldown_s: float = 300.0  # since the last change, before any scale-in


@dataclass
class _ModelScale:
    replicas: int
    changed_at: float


@dataclass
class Autoscaler:
    """Desired replicas per model, with hysteresis: out at once, in slowly.

    `desired(model, short, long, capacity, serving)` takes the demand over a short window
    (reacts to a burst) and over a long one (what scale-in must also satisfy), and how many
    replicas serve the model now: a fresh state (a new leader) starts no lower than that and
    waits a whole cool-down before scaling in, so a failover never undoes a recent scale-out."""

    policy: ScalePolicy
    clock: Callable[[], float]
    _models: dict[str, _ModelScale] = field(default_factory=dict)

    def desired(
        self, model: str, short: TokenRates, long: TokenRates, capacity: TokenRates,
        serving: int = 0,
    ) -> int:
        policy = self.policy
        now = self.clock()

        def size(demand: TokenRates) -> int:
            return size_replicas(demand, capacity, headroom=policy.headroom, zones=policy.zones,
                                 min_copies=policy.min_copies).replicas

        burst, sustained = size(short), size(long)
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _ModelScale(max(burst, sustained, serving), now)
        elif burst > state.replicas:
            state.replicas, state.changed_at = burst, now
        else:
            floor = max(burst, sustained)
            if floor < state.replicas and now - state.changed_at >= policy.scale_in_cooldown_s:
                state.replicas, state.changed_at = floor, now
        return state.replicas

    def models(self) -> set[str]:
        return set(self._models)

    def forget(self, model: str) -> None:
        """A model no longer served: its history must not hold a later one up."""
        self._models.pop(model, None)
