"""What a sidecar knows about its replica, as the etcd values the scheduler reads, and the
placement decisions it takes. Pure: no etcd, Triton or clock here (the sidecar feeds it).

The record (`replicas/<id>`) changes rarely: identity, health, models, KV capacity, draining and
placement errors. The load report (`load/<id>`) changes every few hundred milliseconds: per model,
KV blocks and requests, read from the TensorRT-LLM metric families on Triton's endpoint
(`nv_trt_llm_kv_cache_block_metrics`, `nv_trt_llm_request_metrics`), which the reference and torch
engines export under the same names. A family an engine does not export leaves its fields out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.common.records import KvGeometry, PlacementRecord, ReplicaRecord

__all__ = [
    "ModelLoad",
    "PlacementPlan",
    "ReplicaIdentity",
    "is_idle",
    "load_report",
    "parse_engine_metrics",
    "plan_placement",
    "probe_verdict",
    "replica_record",
    "restarts_within_budget",
]

LOAD_SCHEMA = 1
KV_FAMILY = "nv_trt_llm_kv_cache_block_metrics"
REQUEST_FAMILY = "nv_trt_llm_request_metrics"
# Metric label value → load report field, for each family.
KV_FIELDS = {"max": "kv_max_blocks", "free": "kv_free_blocks", "used": "kv_used_blocks",
             "reused": "kv_reused_blocks", "tokens_per": "kv_tokens_per_block"}
REQUEST_FIELDS = {"active": "active", "waiting": "waiting", "max": "max"}


@dataclass(frozen=True)
class ModelLoad:
    """One model's engine figures from one scrape; None where the engine exports no such value."""

    kv_max_blocks: int | None = None
    kv_free_blocks: int | None = None
    kv_used_blocks: int | None = None
    kv_reused_blocks: int | None = None
    kv_tokens_per_block: int | None = None  # a capacity, published in the record, not the load
    active: int | None = None
    waiting: int | None = None
    max: int | None = None

    def report(self) -> dict[str, int]:
        """The load report's per-model entry: the contract's fields that the engine exports."""
        values = {
            "kv_max_blocks": self.kv_max_blocks, "kv_free_blocks": self.kv_free_blocks,
            "kv_used_blocks": self.kv_used_blocks, "kv_reused_blocks": self.kv_reused_blocks,
            "active": self.active, "waiting": self.waiting, "max": self.max,
        }
        return {name: value for name, value in values.items() if value is not None}

    def kv_capacity(self) -> dict[str, int] | None:
        """The record's `kv` entry, once the engine has told both its pool size and block size."""
        if self.kv_max_blocks is None or self.kv_tokens_per_block is None:
            return None
        return {"max_blocks": self.kv_max_blocks, "tokens_per_block": self.kv_tokens_per_block}


def parse_engine_metrics(text: str) -> dict[str, ModelLoad]:
    """Triton's metrics page → per model (the `model` label) figures from the TensorRT-LLM
    families; other families are ignored. Raises ValueError on a page that is not Prometheus
    text."""
    figures: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == KV_FAMILY:
            label, fields = "kv_cache_block_type", KV_FIELDS
        elif family.name == REQUEST_FAMILY:
            label, fields = "request_type", REQUEST_FIELDS
        else:
            continue
        for sample in family.samples:
            model, kind = sample.labels.get("model"), sample.labels.get(label)
            if model is not None and kind in fields:
                figures.setdefault(model, {})[fields[kind]] = int(sample.value)
    return {model: ModelLoad(**values) for model, values in figures.items()}


def is_idle(loads: Mapping[str, ModelLoad]) -> bool:
    """No model has a request running or waiting: what a draining replica waits for. An engine
    that exports no request counts has nothing to wait for."""
    return all(not (load.active or load.waiting) for load in loads.values())


def load_report(replica_id: str, at: float, loads: Mapping[str, ModelLoad],
                models: Iterable[str]) -> dict[str, Any]:
    """`load/<id>`: the figures of the models this replica serves (`models`), stamped `at`
    (unix seconds) so readers can tell a stale report from a quiet replica."""
    served = set(models)
    return {
        "schema": LOAD_SCHEMA,
        "replica_id": replica_id,
        "at": at,
        "models": {name: load.report() for name, load in sorted(loads.items()) if name in served},
    }


@dataclass(frozen=True)
class ReplicaIdentity:
    """What does not change while a sidecar runs (from its settings)."""

    replica_id: str
    grpc_endpoint: str
    metrics_endpoint: str
    zone: str
    gpu_type: str  # "cpu" where the engine runs on the host's processors
    gpu_memory_mib: int
    sidecar_endpoint: str = ""  # where its KV events are streamed


def replica_record(
    identity: ReplicaIdentity,
    ready: bool,
    versions: Mapping[str, str],
    loads: Mapping[str, ModelLoad],
    draining: bool,
    placement_errors: Mapping[str, str],
    capacity: Mapping[str, tuple[float, float]] | None = None,
    version_ids: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`replicas/<id>`. `versions`: the models Triton has READY that the replica serves (a model
    being unloaded is already left out), with their Triton version. `ready`: Triton answers
    (placement may fill an empty replica); `healthy` also needs a model to route to; `kv` has the
    models whose engines report their cache; `capacity` (model → prefill, decode tokens/s of
    one replica, from the engine's calibrated profile) is published for served models only;
    `version_ids`: the registered version each served model was rendered from."""
    record = ReplicaRecord(
        replica_id=identity.replica_id,
        grpc_endpoint=identity.grpc_endpoint,
        metrics_endpoint=identity.metrics_endpoint,
        sidecar_endpoint=identity.sidecar_endpoint,
        zone=identity.zone,
        gpu_type=identity.gpu_type,
        gpu_memory_mib=identity.gpu_memory_mib,
        models=frozenset(versions),
        versions=dict(versions),
        version_ids={name: vid for name, vid in (version_ids or {}).items() if name in versions},
        kv={name: KvGeometry(**capacity_of) for name in versions if name in loads
            and (capacity_of := loads[name].kv_capacity()) is not None},
        capacity={name: rates for name, rates in (capacity or {}).items() if name in versions},
        ready=ready,
        healthy=ready and bool(versions),
        draining=draining,
        placement_errors=dict(placement_errors),
    )
    return record.encode()


@dataclass(frozen=True)
class PlacementPlan:
    load: frozenset[str] = field(default_factory=frozenset)
    unload: frozenset[str] = field(default_factory=frozenset)


def plan_placement(
    target: PlacementRecord,
    ready: Iterable[str],
    busy: Iterable[str],
    failed: Iterable[str],
    unloading: Iterable[str] = (),
) -> PlacementPlan:
    """What to do now to move towards `target`. A model with an action under way (`busy`) is
    left alone until that action ends, so a model is never unloaded mid-load (nor loaded twice);
    a model whose load or unload failed for this target (`failed`) is not retried until the
    target changes (a new generation), so a broken model is not reloaded every second. Extras
    go first: no load starts while an unload is planned or under way (`unloading`), because the
    target is only known to fit the accelerator's memory once the models leaving are gone."""
    ready, busy, failed = set(ready), set(busy), set(failed)
    unload = frozenset(ready - target.models - busy - failed)
    if unload or set(unloading):
        return PlacementPlan(unload=unload)
    return PlacementPlan(load=frozenset(target.models - ready - busy - failed))


def probe_verdict(gone: bool, answered: bool, misses: int, max_misses: int) -> tuple[bool, int]:
    """After one liveness probe of a model's engine: (restart it now, probes in a row missed
    now). An answer that the engine is gone restarts at once; no answer in time counts a miss,
    and `max_misses` in a row restart (one slow answer on a busy machine does not); any other
    answer — alive, or an error about the probe itself — shows the process alive."""
    if gone:
        return True, 0
    if answered:
        return False, 0
    misses += 1
    return (True, 0) if misses >= max_misses else (False, misses)


def restarts_within_budget(
    history: Iterable[float], now: float, window_s: float, max_restarts: int
) -> tuple[bool, list[float]]:
    """Whether one more engine restart at `now` stays within `max_restarts` per `window_s`,
    and the restart times still inside the window (with `now` when it does). An engine that
    keeps dying is left unloaded and reported instead, so placement moves it elsewhere."""
    recent = [at for at in history if now - at < window_s]
    if len(recent) >= max_restarts:
        return False, recent
    return True, [*recent, now]
