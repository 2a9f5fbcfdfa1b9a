"""Typed codecs of the etcd records that one service writes and another reads.

One codec per record, used by its writer and by every reader, so that the two sides cannot
disagree on a field's meaning. `decode` refuses a malformed value with a ValueError naming the
field (a reader logs it and keeps what it had); `encode` gives the JSON-ready dict `etcd.encode`
stores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def count(value: Any) -> int | None:
    """A count from a record; None when absent, not a number, or negative (not a count)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        return None
    return int(value)


def _text(raw: Mapping[str, Any], name: str, required: bool = False) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"replica {name} must be a{' non-empty' if required else ''} string")
    return value


def _mapping(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"replica {name} must be an object")
    return value

__all__ = ["PLACEMENT_SCHEMA", "REPLICA_SCHEMA", "KvGeometry", "LoadReport", "ModelLoad",
           "PlacementRecord", "ReplicaRecord", "count"]

PLACEMENT_SCHEMA = 2  # 2: `versions` (which registered version each placed model serves)
REPLICA_SCHEMA = 1
_VERSION_REF = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class PlacementRecord:
    """`placements/<replica>`: the Triton models the scheduler's leader wants the replica to
    serve. `versions` maps a placed model to the registered version it serves
    (`name@sha256:<hex>`): the sidecar fetches that version's files from the registry and renders
    its Triton model. A placed model without one is loaded as the replica's repository has it
    (an engine deployed with the replica, not through the registry)."""

    models: frozenset[str]
    generation: int
    versions: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        return {"schema": PLACEMENT_SCHEMA, "models": sorted(self.models),
                "generation": self.generation,
                "versions": {m: ref for m, ref in sorted(self.versions.items())
                             if m in self.models}}

    @classmethod
    def decode(cls, raw: Mapping[str, Any]) -> PlacementRecord:
        if raw.get("schema") != PLACEMENT_SCHEMA:
            raise ValueError(
                f"placement schema must be {PLACEMENT_SCHEMA}, got {raw.get('schema')!r}")
        models = raw.get("models")
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError("placement models must be a list of non-empty model names")
        generation = raw.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise ValueError(f"placement generation must be an integer >= 0, got {generation!r}")
        versions = raw.get("versions", {})
        if not isinstance(versions, dict) or not all(
                isinstance(m, str) and m in models and isinstance(ref, str)
                and _VERSION_REF.match(ref) for m, ref in versions.items()):
            raise ValueError("placement versions must map placed models to name@sha256:<hex>")
        return cls(frozenset(models), generation, dict(versions))


@dataclass(frozen=True)
class KvGeometry:
    """A served model's KV cache as its engine reports it: the pool and the block size."""

    max_blocks: int | None = None
    tokens_per_block: int | None = None


@dataclass(frozen=True)
class ReplicaRecord:
    """`replicas/<id>`, written by the replica's sidecar under its lease; read by the schedulers
    (routing and placement), the gateways and the registry. `models`: the Triton models READY
    and served (one being unloaded is already left out); `versions`: their Triton versions;
    `version_ids`: the registered version each was rendered from; `ready`: Triton answers (an
    empty replica can be filled); `healthy`: ready with a model to route to; `capacity`: model
    → (prefill, decode) tokens/s from a calibrated engine profile. Counts that are missing,
    negative or not numbers read as unknown (None or 0), never as an error."""

    replica_id: str
    grpc_endpoint: str
    metrics_endpoint: str = ""
    zone: str = ""
    gpu_type: str = ""
    gpu_memory_mib: int = 0  # 0: not reported
    models: frozenset[str] = frozenset()
    versions: Mapping[str, str] = field(default_factory=dict)
    version_ids: Mapping[str, str] = field(default_factory=dict)
    kv: Mapping[str, KvGeometry] = field(default_factory=dict)
    capacity: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    ready: bool = False
    healthy: bool = False
    draining: bool = False
    placement_errors: Mapping[str, str] = field(default_factory=dict)
    # The sidecar's own gRPC host:port, where schedulers stream its engines' KV events ("": an
    # older sidecar, which streams none).
    sidecar_endpoint: str = ""

    def encode(self) -> dict[str, Any]:
        return {
            "schema": REPLICA_SCHEMA,
            "replica_id": self.replica_id,
            "grpc_endpoint": self.grpc_endpoint,
            "metrics_endpoint": self.metrics_endpoint,
            **({"sidecar_endpoint": self.sidecar_endpoint} if self.sidecar_endpoint else {}),
            "zone": self.zone,
            "gpu_type": self.gpu_type,
            "gpu_memory_mib": self.gpu_memory_mib,
            "models": sorted(self.models),
            "versions": dict(sorted(self.versions.items())),
            "version_ids": dict(sorted(self.version_ids.items())),
            "kv": {name: {"max_blocks": kv.max_blocks, "tokens_per_block": kv.tokens_per_block}
                   for name, kv in sorted(self.kv.items())},
            "capacity": {name: {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}
                         for name, (prefill, decode) in sorted(self.capacity.items())},
            "ready": self.ready,
            "healthy": self.healthy,
            "draining": self.draining,
            "placement_errors": dict(sorted(self.placement_errors.items())),
        }

    @classmethod
    def decode(cls, raw: Mapping[str, Any]) -> ReplicaRecord:
        if raw.get("schema") != REPLICA_SCHEMA:
            raise ValueError(
                f"replica schema must be {REPLICA_SCHEMA}, got {raw.get('schema')!r}")
        models = raw.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ValueError("replica models must be a list of model names")
        capacity = {}
        for name, rates in _mapping(raw, "capacity").items():
            prefill, decode = (count(rates.get(key)) if isinstance(rates, dict) else None
                               for key in ("prefill_tokens_per_s", "decode_tokens_per_s"))
            if prefill and decode:  # a rate of 0 or an unreadable one: no capacity known
                capacity[str(name)] = (float(rates["prefill_tokens_per_s"]),
                                       float(rates["decode_tokens_per_s"]))
        return cls(
            replica_id=_text(raw, "replica_id", required=True),
            grpc_endpoint=_text(raw, "grpc_endpoint", required=True),
            metrics_endpoint=_text(raw, "metrics_endpoint"),
            sidecar_endpoint=_text(raw, "sidecar_endpoint"),
            zone=_text(raw, "zone"),
            gpu_type=_text(raw, "gpu_type"),
            gpu_memory_mib=count(raw.get("gpu_memory_mib")) or 0,
            models=frozenset(models),
            versions={str(k): str(v) for k, v in _mapping(raw, "versions").items()},
            version_ids={str(k): str(v) for k, v in _mapping(raw, "version_ids").items()},
            kv={str(name): KvGeometry(count(v.get("max_blocks")),
                                      count(v.get("tokens_per_block")))
                for name, v in _mapping(raw, "kv").items() if isinstance(v, dict)},
            capacity=capacity,
            ready=raw.get("ready") is True,
            healthy=raw.get("healthy") is True,
            draining=raw.get("draining") is True,
            placement_errors={str(k): str(v)
                              for k, v in _mapping(raw, "placement_errors").items()},
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
    """`load/<id>`: a replica's latest load report, written by its sidecar every few hundred ms
    and read by the schedulers (and by gateways routing on their own). Freshness is judged by
    when the report *arrived* on the reader's own clock, not by the sidecar's `at` stamp, so
    clock skew between machines cannot keep a dead replica routable."""

    replica_id: str
    received_at: float  # the reader's monotonic clock when the report arrived
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
