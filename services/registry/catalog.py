"""The registry's read side: every model's versions and aliases, resolved from a local copy.

`ModelCatalog` is fed by a watch on `models/` (see `store.py`) and answers `resolve()` with a
dict lookup, so the gateway's hot path never waits on etcd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.common import errors
from services.registry.manifest import ModelRef, ModelVersion, parse_ref


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias → version id


class ModelCatalog:
    """Builds `ModelEntry`s from the raw `models/` keyspace (suffix → decoded JSON)."""

    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}

    def rebuild(self, items: dict[str, Any]) -> None:
        models: dict[str, ModelEntry] = {}
        for suffix, value in items.items():
            name, _, rest = suffix.partition("/")
            entry = models.setdefault(name, ModelEntry(name))
            if rest.startswith("versions/"):
                version = ModelVersion(value["version_id"], value["manifest"])
                entry.versions[version.version_id] = version
            elif rest == "routing":
                entry.aliases = {k: v for k, v in value["aliases"].items() if v}
        self._models = {name: e for name, e in models.items() if e.versions}

    def models(self) -> list[ModelEntry]:
        return sorted(self._models.values(), key=lambda e: e.name)

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise errors.NotFound(f"model {name!r} does not exist")
        return entry

    def resolve(self, ref: str | ModelRef, field: str = "model") -> ModelVersion:
        """The version a reference means now; NotFound names what is missing."""
        parsed = parse_ref(ref, field) if isinstance(ref, str) else ref
        entry = self.entry(parsed.name)
        version_id = parsed.version_id or entry.aliases.get(parsed.alias, "")
        if not version_id:
            raise errors.NotFound(f"model {parsed.name!r} has no {parsed.alias!r} alias")
        version = entry.versions.get(version_id)
        if version is None:
            raise errors.NotFound(f"model {parsed.name!r} has no version {version_id}")
        return version
