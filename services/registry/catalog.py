"""The registry's read side: every model's versions and routing, resolved from a local copy.

`ModelCatalog` is fed by a watch on `models/` (see `store.py`) and answers `resolve()` and
`route()` with dict lookups and a hash, so the gateway's hot path never waits on etcd and a
rollback is served as soon as the watch delivers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common import errors
from services.registry.manifest import ModelRef, ModelVersion, parse_ref
from services.registry.rollout import Routing, assignment_bucket, in_canary, shadow_sampled


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    routing: Routing = field(default_factory=Routing)


@dataclass(frozen=True)
class Resolution:
    """Where one request goes: the version that answers it and, when sampled, a shadow copy."""

    version: ModelVersion
    # production | canary | previous (production still loading) | pinned (an explicit @alias or
    # @sha256 reference)
    arm: str
    shadow: ModelVersion | None = None


class ModelCatalog:
    """Builds `ModelEntry`s from the raw `models/` keyspace (suffix → decoded JSON)."""

    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}

    def rebuild(self, items: dict[str, Any]) -> None:
        models: dict[str, ModelEntry] = {}
        for suffix, value in items.items():
            name, _, rest = suffix.partition("/")
            if rest.startswith("versions/"):
                entry = models.setdefault(name, ModelEntry(name))
                version = ModelVersion(
                    value["version_id"], value["manifest"], value.get("registered_at", 0.0),
                    value.get("registered_by", ""),
                )
                entry.versions[version.version_id] = version
            elif rest == "routing":
                models.setdefault(name, ModelEntry(name)).routing = Routing.from_record(value)
        self._models = {name: e for name, e in models.items() if e.versions}

    def models(self) -> list[ModelEntry]:
        return sorted(self._models.values(), key=lambda e: e.name)

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise errors.NotFound(f"model {name!r} does not exist")
        return entry

    def resolve(self, ref: str | ModelRef, field: str = "model") -> ModelVersion:
        """The version a reference names now (a bare name: production); NotFound names what is
        missing."""
        parsed = parse_ref(ref, field) if isinstance(ref, str) else ref
        entry = self.entry(parsed.name)
        version_id = parsed.version_id or entry.routing.target(parsed.alias)
        if not version_id:
            raise errors.NotFound(f"model {parsed.name!r} has no {parsed.alias!r} version")
        return self._version(entry, version_id)

    def route(self, ref: str, tenant: str, user: str, request_id: str,
              serving: Callable[[str], bool] = lambda _model: True) -> Resolution:
        """Where a client's request goes. A bare name follows the rollout (the sticky canary
        split and the shadow sample); an explicit `@alias` or `@sha256:` is served as named and
        is never copied to the shadow.

        `serving(triton_model)` says whether any replica serves a version now. The rollout
        moves traffic only to versions that are loaded: a canary still loading leaves its
        users on production, and a just-promoted version still loading leaves the traffic on
        the previous one (arm `previous`), so a rollout never turns into errors while a version
        is fetched and loaded. A pinned version is served as named, or UNAVAILABLE."""
        parsed = parse_ref(ref)
        if parsed.explicit:
            return Resolution(self.resolve(parsed), "pinned")
        entry = self.entry(parsed.name)
        routing = entry.routing
        version, arm = self.resolve(parsed), "production"
        if in_canary(routing, assignment_bucket(parsed.name, tenant, user)):
            canary = self._version(entry, routing.canary)
            if serving(canary.triton_model_name):
                version, arm = canary, "canary"
        if arm == "production" and routing.previous and not serving(version.triton_model_name):
            previous = self._version(entry, routing.previous)
            if serving(previous.triton_model_name):
                version, arm = previous, "previous"
        shadow = None
        if shadow_sampled(routing, request_id):
            shadow = self._version(entry, routing.shadow)
        return Resolution(version, arm, shadow)

    @staticmethod
    def _version(entry: ModelEntry, version_id: str) -> ModelVersion:
        version = entry.versions.get(version_id)
        if version is None:
            raise errors.NotFound(f"model {entry.name!r} has no version {version_id}")
        return version
