"""Rollouts: which versions serve a model, how a change moves them, and who lands where.

Pure logic (no etcd, no gRPC). `Routing` is one model's state; `apply_change` is the only way
it changes, so the registry service and its tests share one set of rules:

    promote V        production ← V, previous ← old production; a canary or shadow on V ends
    canary V w%      sticky share w of tenants/users go to V (production must exist)
    clear_canary     everyone on production
    shadow V r       a share r of requests is copied to V; its output is thrown away
    clear_shadow
    rollback         production ↔ previous (so a second rollback undoes the first)

Canary assignment hashes (model, tenant, user) into 10,000 buckets; a bucket below
`weight × 100` goes to the canary. The same caller stays on the same side while the weight is
unchanged, and raising the weight only moves callers from production to the canary.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.common import errors

BUCKETS = 10_000
MAX_REASON_CHARS = 1024


@dataclass(frozen=True)
class Routing:
    revision: int = 0  # every change adds one; what a compare-and-swap compares
    production: str = ""
    previous: str = ""
    canary: str = ""
    canary_weight_percent: float = 0.0
    shadow: str = ""
    shadow_rate: float = 0.0
    updated_at: float = 0.0  # unix seconds
    updated_by: str = ""

    def target(self, alias: str) -> str:
        """The version an alias names now ("" when unset)."""
        return {"production": self.production, "previous": self.previous,
                "canary": self.canary, "shadow": self.shadow}[alias]

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Routing:
        if "aliases" in record:  # schema 1 (the walking skeleton): production and previous only
            aliases = record["aliases"]
            return cls(production=aliases.get("production", ""),
                       previous=aliases.get("previous", ""))
        fields = cls.__dataclass_fields__
        return cls(**{key: value for key, value in record.items() if key in fields})


@dataclass(frozen=True)
class Promote:
    version_id: str


@dataclass(frozen=True)
class SetCanary:
    version_id: str
    weight_percent: float


@dataclass(frozen=True)
class ClearCanary:
    pass


@dataclass(frozen=True)
class SetShadow:
    version_id: str
    rate: float


@dataclass(frozen=True)
class ClearShadow:
    pass


@dataclass(frozen=True)
class Rollback:
    pass


Change = Promote | SetCanary | ClearCanary | SetShadow | ClearShadow | Rollback
ACTIONS: dict[type, str] = {
    Promote: "promote", SetCanary: "canary", ClearCanary: "clear_canary",
    SetShadow: "shadow", ClearShadow: "clear_shadow", Rollback: "rollback",
}


@dataclass(frozen=True)
class HistoryEntry:
    """One routing change as the model's history keeps it."""

    revision: int  # the routing revision this change made
    action: str
    actor: str
    reason: str
    at: float  # unix seconds
    before: Routing
    after: Routing

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "before": self.before.to_record(),
                "after": self.after.to_record()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> HistoryEntry:
        return cls(
            revision=record["revision"], action=record["action"], actor=record["actor"],
            reason=record["reason"], at=record["at"],
            before=Routing.from_record(record["before"]),
            after=Routing.from_record(record["after"]),
        )


def action_name(change: Change) -> str:
    return ACTIONS[type(change)]


def validate_reason(reason: str) -> str:
    if not reason.strip():
        raise errors.InvalidArgument("reason", "is required: say why (it goes into the history)")
    if len(reason) > MAX_REASON_CHARS:
        raise errors.InvalidArgument("reason", f"must be at most {MAX_REASON_CHARS} characters")
    return reason


def apply_change(
    routing: Routing, change: Change, model: str, actor: str, now: float
) -> Routing:
    """The routing after `change`; FailedPrecondition when the current state forbids it.

    Whether a named version exists is the caller's check (it needs the store).
    """
    if isinstance(change, Promote):
        target = change.version_id
        if target == routing.production:
            raise errors.FailedPrecondition(f"{target} is already {model}'s production version")
        after = replace(routing, production=target, previous=routing.production or routing.previous)
        if after.canary == target:
            after = replace(after, canary="", canary_weight_percent=0.0)
        if after.shadow == target:
            after = replace(after, shadow="", shadow_rate=0.0)
    elif isinstance(change, SetCanary):
        _need_production(routing, model, "a canary")
        if change.version_id == routing.production:
            raise errors.FailedPrecondition(f"{change.version_id} is already production")
        if not (math.isfinite(change.weight_percent) and 0.0 < change.weight_percent <= 100.0):
            raise errors.InvalidArgument("canary.weight_percent", "must be in (0, 100]")
        after = replace(routing, canary=change.version_id,
                        canary_weight_percent=change.weight_percent)
    elif isinstance(change, ClearCanary):
        if not routing.canary:
            raise errors.FailedPrecondition(f"{model} has no canary")
        after = replace(routing, canary="", canary_weight_percent=0.0)
    elif isinstance(change, SetShadow):
        _need_production(routing, model, "a shadow")
        if change.version_id == routing.production:
            raise errors.FailedPrecondition(
                f"{change.version_id} is production; a shadow must be another version"
            )
        if not (math.isfinite(change.rate) and 0.0 < change.rate <= 1.0):
            raise errors.InvalidArgument("shadow.rate", "must be in (0, 1]")
        after = replace(routing, shadow=change.version_id, shadow_rate=change.rate)
    elif isinstance(change, ClearShadow):
        if not routing.shadow:
            raise errors.FailedPrecondition(f"{model} has no shadow")
        after = replace(routing, shadow="", shadow_rate=0.0)
    else:
        if not routing.previous:
            raise errors.FailedPrecondition(f"{model} has no previous version to roll back to")
        after = replace(routing, production=routing.previous, previous=routing.production)
        if after.canary == after.production:
            after = replace(after, canary="", canary_weight_percent=0.0)
        if after.shadow == after.production:
            after = replace(after, shadow="", shadow_rate=0.0)
    return replace(after, revision=routing.revision + 1, updated_at=now, updated_by=actor)


def _need_production(routing: Routing, model: str, what: str) -> None:
    if not routing.production:
        raise errors.FailedPrecondition(
            f"{model} has no production version; promote one before {what}")


def _unit_hash(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assignment_bucket(model: str, tenant: str, user: str) -> int:
    """The caller's fixed bucket in [0, BUCKETS) for `model` (sticky canary assignment)."""
    return _unit_hash("canary", model, tenant, user) % BUCKETS


def in_canary(routing: Routing, bucket: int) -> bool:
    return bool(routing.canary) and bucket < round(routing.canary_weight_percent * BUCKETS / 100)


def shadow_sampled(routing: Routing, request_id: str) -> bool:
    """Whether this request is copied to the shadow (a hash of its id, so retries agree)."""
    if not routing.shadow:
        return False
    return _unit_hash("shadow", request_id) % BUCKETS < round(routing.shadow_rate * BUCKETS)
