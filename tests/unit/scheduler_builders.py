"""Builders for routing tests: replicas, load reports and queries, like vLLM's create_requests."""

from __future__ import annotations

from services.scheduler.candidates import RouteQuery
from services.scheduler.inventory import LoadReport, ModelLoad, ReplicaInfo


def replica(rid: str, models=("m",), healthy=True, zone="", draining=False) -> ReplicaInfo:
    return ReplicaInfo(rid, f"{rid}:1", zone=zone, models=frozenset(models), healthy=healthy,
                       draining=draining)


def report(rid: str, at: float = 0.0, *, free=100, max_blocks=100, active=0, waiting=0, batch=8,
           model="m") -> LoadReport:
    return LoadReport(rid, at, {model: ModelLoad(
        kv_max_blocks=max_blocks, kv_free_blocks=free, kv_used_blocks=max_blocks - free,
        active=active, waiting=waiting, max=batch)})


def query(model="m", *, hashes=(), zone="", exclude=(), hold_s=10.0, prompt_tokens=0,
          kv_hashes=(), kv_block_tokens=4) -> RouteQuery:
    return RouteQuery(model=model, hold_s=hold_s, prompt_tokens=prompt_tokens,
                      prefix_hashes=tuple(hashes), zone=zone, exclude=frozenset(exclude),
                      kv_block_hashes=tuple(kv_hashes), kv_block_tokens=kv_block_tokens)
