"""What the scheduler knows of each replica: its record and its latest load report, parsed
tolerantly from the sidecars' etcd values (a missing field is "unknown", never an error).

Freshness is judged by when a report *arrived* on the scheduler's own clock, not by the
sidecar's `at` stamp, so clock skew between machines cannot keep a dead replica routable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _int(value: Any) -> int | None:
    """A count from a record; None when absent, not a number, or negative (not a count)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        return None
    return int(value)


@dataclass(frozen=True)
class ModelKv:
    """A model's KV-cache geometry on a replica, as the sidecar registered it."""

    max_blocks: int | None = None
    tokens_per_block: int | None = None


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica as its sidecar registered it under a lease."""

    replica_id: str
    grpc_endpoint: str
    metrics_endpoint: str = ""
    zone: str = ""
    models: frozenset[str] = field(default_factory=frozenset)
    healthy: bool = True
    draining: bool = False
    gpu_type: str = ""
    gpu_memory_mib: int | None = None
    kv: dict[str, ModelKv] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ReplicaInfo:
        kv = record.get("kv")
        return cls(
            replica_id=str(record["replica_id"]),
            grpc_endpoint=str(record["grpc_endpoint"]),
            metrics_endpoint=str(record.get("metrics_endpoint", "")),
            zone=str(record.get("zone", "")),
            models=frozenset(str(m) for m in record.get("models", ())),
            healthy=record.get("healthy") is True,
            draining=record.get("draining") is True,
            gpu_type=str(record.get("gpu_type", "")),
            gpu_memory_mib=_int(record.get("gpu_memory_mib")),
            kv={
                str(model): ModelKv(_int(v.get("max_blocks")), _int(v.get("tokens_per_block")))
                for model, v in kv.items() if isinstance(v, dict)
            } if isinstance(kv, dict) else {},
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
            kv_max_blocks=_int(raw.get("kv_max_blocks")),
            kv_free_blocks=_int(raw.get("kv_free_blocks")),
            kv_used_blocks=_int(raw.get("kv_used_blocks")),
            kv_reused_blocks=_int(raw.get("kv_reused_blocks")),
            active=_int(raw.get("active")),
            waiting=_int(raw.get("waiting")),
            max=_int(raw.get("max")),
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
