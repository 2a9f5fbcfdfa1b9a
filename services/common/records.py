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

__all__ = ["PLACEMENT_SCHEMA", "PlacementRecord"]

PLACEMENT_SCHEMA = 2  # 2: `versions` (which registered version each placed model serves)
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
