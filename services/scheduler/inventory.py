"""What the scheduler knows of each replica: its record (decoded by the record's own codec) and
its latest load report, parsed tolerantly (a missing field is "unknown", never an error).

Freshness is judged by when a report *arrived* on the scheduler's own clock, not by the
sidecar's `at` stamp, so clock skew between machines cannot keep a dead replica routable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.records import KvGeometry, ReplicaRecord, count


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica as its sidecar registered it under a lease: what routing needs of its record."""

    replica_id: str
    grpc_endpoint: str
    metrics_endpoint: str = ""
    zone: str = ""
    models: frozenset[str] = field(default_factory=frozenset)
    healthy: bool = True
    draining: bool = False
    gpu_type: str = ""
    gpu_memory_mib: int | None = None
    kv: Mapping[str, KvGeometry] = field(default_factory=dict)

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> ReplicaInfo:
        """Through the record's one codec (`services.common.records.ReplicaRecord`)."""
        record = ReplicaRecord.decode(raw)
        return cls(
            replica_id=record.replica_id, grpc_endpoint=record.grpc_endpoint,
            metrics_endpoint=record.metrics_endpoint, zone=record.zone, models=record.models,
            healthy=record.healthy, draining=record.draining, gpu_type=record.gpu_type,
            gpu_memory_mib=record.gpu_memory_mib or None, kv=record.kv,
        )


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model's figures from a load report; None where the engine did not say."""

    kv_max_blocks: int | None = None
    kv_free_blocks: int | None = None
    kv_used_blocks: int | None = None
    kv_reused_blocks: int | None = None
    active: int | None = None
    waiting: int | None = None
    max: int | None = None
    # Derived once here, read on every route: the free share of KV blocks, and the requests the
    # engine holds (running + waiting); None when the report lacks what they need.
    kv_free_fraction: float | None = field(init=False, default=None)
    queue: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.kv_max_blocks and self.kv_free_blocks is not None:
            object.__setattr__(self, "kv_free_fraction",
                               min(1.0, max(0.0, self.kv_free_blocks / self.kv_max_blocks)))
        if self.active is not None or self.waiting is not None:
            object.__setattr__(self, "queue", (self.active or 0) + (self.waiting or 0))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelLoad:
        return cls(
            kv_max_blocks=count(raw.get("kv_max_blocks")),
            kv_free_blocks=count(raw.get("kv_free_blocks")),
            kv_used_blocks=count(raw.get("kv_used_blocks")),
            kv_reused_blocks=count(raw.get("kv_reused_blocks")),
            active=count(raw.get("active")),
            waiting=count(raw.get("waiting")),
            max=count(raw.get("max")),
        )


@dataclass(frozen=True)
class LoadReport:
    """A replica's latest load report."""

    replica_id: str
    received_at: float  # the scheduler's monotonic clock when the report arrived
    models: dict[str, ModelLoad] = field(default_factory=dict)

    @classmethod
    def from_record(cls, replica_id: str, record: dict[str, Any], received_at: float) -> LoadReport:
        models = record.get("models")
        return cls(
            replica_id=replica_id,
            received_at=received_at,
            models={
                str(name): ModelLoad.from_dict(figures)
                for name, figures in models.items() if isinstance(figures, dict)
            } if isinstance(models, dict) else {},
        )
