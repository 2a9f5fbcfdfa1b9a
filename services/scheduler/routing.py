"""Routing: pick a healthy replica that serves the model, least in-flight first.

Pure logic with an injected clock. In-flight counts are this scheduler's own reservations, each
held until released or until its hold expires (so a gateway that dies leaks nothing for long).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common import errors


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica as its sidecar registered it under a lease."""

    replica_id: str
    grpc_endpoint: str
    metrics_endpoint: str = ""
    zone: str = ""
    models: frozenset[str] = field(default_factory=frozenset)
    healthy: bool = True

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ReplicaInfo:
        return cls(
            replica_id=record["replica_id"],
            grpc_endpoint=record["grpc_endpoint"],
            metrics_endpoint=record.get("metrics_endpoint", ""),
            zone=record.get("zone", ""),
            models=frozenset(record.get("models", ())),
            healthy=bool(record.get("healthy", False)),
        )


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    replica: ReplicaInfo


class Router:
    def __init__(self) -> None:
        self._reservations: dict[str, tuple[str, float]] = {}  # id → (replica id, expiry)

    def route(
        self,
        replicas: Iterable[ReplicaInfo],
        model: str,
        now: float,
        hold_s: float,
        exclude: Iterable[str] = (),
    ) -> Reservation:
        """Reserves the least-loaded candidate (ties: lowest replica id). Unavailable if none."""
        self._expire(now)
        excluded = set(exclude)
        candidates = [
            r for r in replicas if r.healthy and model in r.models and r.replica_id not in excluded
        ]
        if not candidates:
            raise errors.Unavailable(
                f"no healthy replica serves {model!r}", retry_after_s=1.0
            )
        load = self.in_flight()
        chosen = min(candidates, key=lambda r: (load.get(r.replica_id, 0), r.replica_id))
        reservation_id = uuid.uuid4().hex
        self._reservations[reservation_id] = (chosen.replica_id, now + hold_s)
        return Reservation(reservation_id, chosen)

    def release(self, reservation_id: str) -> bool:
        return self._reservations.pop(reservation_id, None) is not None

    def in_flight(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for replica_id, _ in self._reservations.values():
            counts[replica_id] = counts.get(replica_id, 0) + 1
        return counts

    def _expire(self, now: float) -> None:
        for rid in [k for k, (_, expiry) in self._reservations.items() if expiry <= now]:
            del self._reservations[rid]
