"""Placement: which Triton models each replica should have loaded. Pure logic, no etcd.

Inputs are the replicas as their sidecars report them and the models the registry's routing
wants served; the output is, per replica, the set of Triton models its sidecar should load.

Rules, in the order they bind:
- A replica's GPU memory is never exceeded by what placement adds (models are sized by their
  manifests' `engine.gpu_memory_mib`; a replica reporting no memory takes only models that state
  none).
- Minimal churn: whatever a replica has loaded, or was told to load and is still loading, stays
  as long as it is wanted. Nothing moves just to tidy up, and surplus copies stay loaded.
- A loaded model that nothing wants is unloaded only when its memory is needed for a wanted one
  (we may not know everything an operator or a test relies on, so we stay conservative).
- Every wanted model gets its copies, in priority order: production, then previous (kept warm
  for an instant rollback), then canary, then shadow; larger models first within a priority
  (first-fit decreasing packs tighter). New copies go to the zone with the fewest copies of that
  model, then to the replica the model fits most tightly (best fit), then by replica id.
- Draining or unhealthy replicas get nothing new and lose nothing either (their last placement
  stands, so one that recovers has not been emptied meanwhile); a (replica, model) pair whose
  load failed is `blocked` (the caller backs off) and gets nothing either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.records import ReplicaRecord
from services.registry.catalog import ModelEntry

# Placement priority, first is highest. "pinned": a version in no role that clients asked for
# by its id (`model@sha256:…`) within the demand window; loaded once, on demand.
ROLES = ("production", "previous", "canary", "shadow", "pinned")


@dataclass(frozen=True)
class ReplicaState:
    """What placement needs from a replica record (`replicas/<id>`, written by its sidecar)."""

    replica_id: str
    zone: str = ""
    gpu_memory_mib: int = 0  # 0: not reported
    loaded: frozenset[str] = frozenset()  # Triton models loaded and READY
    failed: frozenset[str] = frozenset()  # Triton models whose last load failed (see Backoff)
    draining: bool = False
    healthy: bool = True
    gpu_type: str = ""
    capacity: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # model → (p, d)

    @property
    def eligible(self) -> bool:
        """May receive new models."""
        return self.healthy and not self.draining

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> ReplicaState:
        """Through the record's one codec (`services.common.records.ReplicaRecord`)."""
        record = ReplicaRecord.decode(raw)
        return cls(
            replica_id=record.replica_id,
            zone=record.zone,
            gpu_memory_mib=record.gpu_memory_mib,
            loaded=record.models,
            failed=frozenset(record.placement_errors),
            draining=record.draining,
            # "healthy" needs a model loaded; "ready" (Triton up, maybe empty) lets a fresh
            # replica be filled.
            healthy=record.healthy or record.ready,
            gpu_type=record.gpu_type,
            capacity=record.capacity,
        )


@dataclass(frozen=True)
class WantedModel:
    """A Triton model the routing needs served, and how many copies of it."""

    triton_model: str
    memory_mib: int
    copies: int
    role: str  # the highest-priority role any version with this Triton model plays

    @property
    def priority(self) -> int:
        return ROLES.index(self.role)


@dataclass(frozen=True)
class Placement:
    models: dict[str, frozenset[str]]  # replica id → Triton models it should have loaded
    shortfalls: dict[str, int]  # Triton model → copies wanted but placed nowhere
    evicted: list[tuple[str, str]]  # (replica id, model) unloaded to make room


def model_memory(entries: Iterable[ModelEntry]) -> dict[str, int]:
    """Triton model → GPU memory it needs: the largest any registered version states."""
    memory: dict[str, int] = {}
    for entry in entries:
        for version in entry.versions.values():
            name = version.triton_model_name
            memory[name] = max(memory.get(name, 0),
                               int(version.engine.get("gpu_memory_mib", 0) or 0))
    return memory


def version_refs(entries: Iterable[ModelEntry]) -> dict[str, str]:
    """Triton model → the registered version it serves (`name@sha256:<hex>`), for every version
    of every model: what a placement tells a replica to fetch and render."""
    return {version.triton_model_name: f"{entry.name}@{version.version_id}"
            for entry in entries for version in entry.versions.values()}


def wanted_models(
    entries: Iterable[ModelEntry], desired: Mapping[str, int], min_copies: int
) -> list[WantedModel]:
    """What the routing wants served: every production version at least `min_copies` times (or
    as many as `desired` asks, by Triton model), previous, canary and shadow at least once, and
    any other version clients asked for (it has demand: `desired` names it) once."""
    entries = list(entries)
    memory = model_memory(entries)
    wanted: dict[str, WantedModel] = {}
    for entry in entries:
        for role in ROLES:
            if role == "pinned":
                versions = [v for v in entry.versions.values() if v.triton_model_name in desired]
            else:
                target = entry.versions.get(entry.routing.target(role))
                versions = [target] if target is not None else []
            for version in versions:
                _want(wanted, version.triton_model_name, role, memory, desired, min_copies)
    return list(wanted.values())


def _want(wanted: dict[str, WantedModel], name: str, role: str, memory: Mapping[str, int],
          desired: Mapping[str, int], min_copies: int) -> None:
    """Adds `name` in `role`, or raises what it already has to the higher role and copies."""
    floor = min_copies if role == "production" else 1
    copies = max(floor, desired.get(name, 0)) if role in ("production", "canary") else floor
    have = wanted.get(name)
    if have is not None:
        copies = max(copies, have.copies)
        role = ROLES[min(have.priority, ROLES.index(role))]
    wanted[name] = WantedModel(name, memory.get(name, 0), copies, role)


def place(
    replicas: Iterable[ReplicaState],
    wanted: Iterable[WantedModel],
    *,
    pending: Mapping[str, Iterable[str]] | None = None,
    blocked: Iterable[tuple[str, str]] = (),
    memory: Mapping[str, int] | None = None,
) -> Placement:
    """The placement for every replica given.

    `pending`: the placement last written per replica (models told to load that are not loaded
    yet count as copies, so a slow load is not placed twice). `blocked`: (replica, model) pairs
    not to place now. `memory`: GPU memory of models not in `wanted` (so evicting them can be
    sized); unknown models count as 0."""
    pending = pending or {}
    blocked_pairs = set(blocked)
    wanted = sorted(wanted, key=lambda w: (w.priority, -w.memory_mib, w.triton_model))
    by_name = {w.triton_model: w for w in wanted}
    size = {**(memory or {}), **{w.triton_model: w.memory_mib for w in wanted}}
    states = {r.replica_id: r for r in replicas}
    assigned: dict[str, set[str]] = {}
    for rid, replica in states.items():
        if not replica.eligible:  # left as it was told: it may come back with the same models
            assigned[rid] = set(pending.get(rid, replica.loaded))
            continue
        assigned[rid] = set(replica.loaded) | {
            m for m in pending.get(rid, ())
            if m in by_name and (rid, m) not in blocked_pairs
        }
    evicted: list[tuple[str, str]] = []
    shortfalls: dict[str, int] = {}

    def used(rid: str) -> int:
        return sum(size.get(m, 0) for m in assigned[rid])

    for want in wanted:
        holders = [rid for rid, models in assigned.items()
                   if want.triton_model in models and states[rid].eligible]
        missing = want.copies - len(holders)
        zone_copies: dict[str, int] = {}
        for rid in holders:
            zone_copies[states[rid].zone] = zone_copies.get(states[rid].zone, 0) + 1
        for _ in range(max(0, missing)):
            chosen = _choose(want, states, assigned, blocked_pairs, zone_copies, used, size,
                             by_name)
            if chosen is None:
                shortfalls[want.triton_model] = shortfalls.get(want.triton_model, 0) + 1
                continue
            rid, evict = chosen
            for model in evict:
                assigned[rid].discard(model)
                evicted.append((rid, model))
            assigned[rid].add(want.triton_model)
            zone = states[rid].zone
            zone_copies[zone] = zone_copies.get(zone, 0) + 1
    return Placement({rid: frozenset(m) for rid, m in assigned.items()}, shortfalls, evicted)


def _choose(want, states, assigned, blocked_pairs, zone_copies, used, size, wanted_names):
    """(replica id, models to evict) for one new copy of `want`, or None when none can take it."""
    options = []
    for rid, replica in states.items():
        if (not replica.eligible or want.triton_model in assigned[rid]
                or (rid, want.triton_model) in blocked_pairs):
            continue
        free = replica.gpu_memory_mib - used(rid)
        evict: list[str] = []
        if want.memory_mib > free:  # room only by unloading what nothing wants, largest first
            extras = sorted((m for m in assigned[rid] if m not in wanted_names),
                            key=lambda m: (-size.get(m, 0), m))
            for model in extras:
                if want.memory_mib <= free:
                    break
                if size.get(model, 0) > 0:
                    evict.append(model)
                    free += size[model]
            if want.memory_mib > free:
                continue
        left = free - want.memory_mib
        options.append(((zone_copies.get(replica.zone, 0), len(evict), left, rid), rid, evict))
    if not options:
        return None
    _, rid, evict = min(options)
    return rid, evict


@dataclass
class _Failure:
    failures: int
    retry_at: float


@dataclass
class LoadBackoff:
    """Failed loads are retried after a delay that doubles with each failure (`initial_s`,
    2×, 4×, … up to `max_s`), so a model that cannot load is never retried in a hot loop.

    `observe` reads the sidecars' `placement_errors`; an error counts only for a model the
    replica was told to load, and a successful load forgets the pair."""

    initial_s: float = 30.0
    max_s: float = 600.0
    _pairs: dict[tuple[str, str], _Failure] = field(default_factory=dict)

    def observe(
        self, replicas: Iterable[ReplicaState], placed: Mapping[str, Iterable[str]], now: float
    ) -> list[tuple[str, str]]:
        """Records new failures; returns the pairs that just started backing off."""
        started = []
        present = set()
        for replica in replicas:
            present.add(replica.replica_id)
            told = set(placed.get(replica.replica_id, ()))
            for model in replica.loaded:
                self._pairs.pop((replica.replica_id, model), None)
            for model in replica.failed - replica.loaded:
                pair = (replica.replica_id, model)
                known = self._pairs.get(pair)
                if model not in told or (known is not None and now < known.retry_at):
                    continue
                failures = known.failures + 1 if known else 1
                delay = min(self.max_s, self.initial_s * 2 ** (failures - 1))
                self._pairs[pair] = _Failure(failures, now + delay)
                started.append(pair)
        for pair in [p for p in self._pairs if p[0] not in present]:
            del self._pairs[pair]
        return started

    def blocked(self, now: float) -> set[tuple[str, str]]:
        return {pair for pair, failure in self._pairs.items() if now < failure.retry_at}
