"""What the scheduler knows of each replica: its record (decoded by the record's own codec) and
its latest load report, parsed tolerantly (a missing field is "unknown", never an error).

Freshness is judged by when a report *arrived* on the scheduler's own clock, not by the
sidecar's `at` stamp, so clock skew between machines cannot keep a dead replica routable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.records import KvGeometry, LoadReport, ModelLoad, ReplicaRecord

__all__ = ["LoadReport", "ModelLoad", "ReplicaInfo"]  # the load report's codec is shared


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
    sidecar_endpoint: str = ""  # where its engines' KV events stream ("": none)

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> ReplicaInfo:
        """Through the record's one codec (`services.common.records.ReplicaRecord`)."""
        record = ReplicaRecord.decode(raw)
        return cls(
            replica_id=record.replica_id, grpc_endpoint=record.grpc_endpoint,
            metrics_endpoint=record.metrics_endpoint, zone=record.zone, models=record.models,
            healthy=record.healthy, draining=record.draining, gpu_type=record.gpu_type,
            gpu_memory_mib=record.gpu_memory_mib or None, kv=record.kv,
            sidecar_endpoint=record.sidecar_endpoint,
        )
