"""Model manifests: validation, canonical form and the content-addressed version id.

The version id is `sha256:` + the hex digest of the manifest's canonical JSON (every field
present, keys sorted, no whitespace), so the same manifest always gets the same id and any change,
even to the description, makes a new version.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from services.common import errors

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
ALIAS = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
TOKENIZERS = ("whitespace", "huggingface")
DTYPES = ("", "float32", "bfloat16", "float16")  # "" = the engine's default
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelVersion:
    """One immutable registered version: its id and the manifest (as canonical-form dict)."""

    version_id: str
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def triton_model_name(self) -> str:
        return self.manifest["triton_model_name"]

    @property
    def tokenizer(self) -> str:
        return self.manifest["tokenizer"]

    @property
    def context_window(self) -> int:
        return self.manifest["engine"]["context_window"]

    @property
    def max_output_tokens(self) -> int:
        return self.manifest["engine"]["max_output_tokens"]

    @property
    def sampling(self) -> dict[str, Any]:
        return self.manifest["sampling"]


def canonical_json(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def version_id(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Refuses a manifest that could not be served; errors name the field and the limit."""
    if not MODEL_NAME.match(manifest.get("name", "")):
        raise errors.InvalidArgument(
            "manifest.name", "must be 1-64 characters of a-z, 0-9, '.', '_' and '-'"
        )
    if not manifest.get("triton_model_name"):
        raise errors.InvalidArgument("manifest.triton_model_name", "is required")
    if manifest.get("tokenizer") not in TOKENIZERS:
        raise errors.InvalidArgument("manifest.tokenizer", f"must be one of {TOKENIZERS}")
    engine = manifest.get("engine", {})
    context_window = engine.get("context_window", 0)
    if not 1 <= context_window <= 1_048_576:
        raise errors.InvalidArgument("manifest.engine.context_window", "must be 1..1048576")
    if not 1 <= engine.get("max_output_tokens", 0) <= context_window:
        raise errors.InvalidArgument(
            "manifest.engine.max_output_tokens", f"must be 1..context_window ({context_window})"
        )
    for field in ("num_blocks", "page_size", "max_batch_tokens"):
        if not 0 <= engine.get(field, 0) <= 1_048_576:
            raise errors.InvalidArgument(f"manifest.engine.{field}", "must be 0..1048576")
    if engine.get("dtype", "") not in DTYPES:
        raise errors.InvalidArgument("manifest.engine.dtype", f"must be one of {DTYPES}")
    for field in ("weights", "tokenizer_files"):
        _validate_files(field, manifest.get(field, []))
    if manifest["tokenizer"] == "huggingface" and "tokenizer.json" not in {
        f["name"] for f in manifest.get("tokenizer_files", [])
    }:
        raise errors.InvalidArgument(
            "manifest.tokenizer_files", "a huggingface tokenizer needs a tokenizer.json"
        )
    sampling = manifest.get("sampling", {})
    if not 1 <= sampling.get("max_tokens", 0) <= engine["max_output_tokens"]:
        raise errors.InvalidArgument(
            "manifest.sampling.max_tokens",
            f"must be 1..engine.max_output_tokens ({engine['max_output_tokens']})",
        )
    if not 0.0 <= sampling.get("temperature", 0.0) <= 2.0:
        raise errors.InvalidArgument("manifest.sampling.temperature", "must be 0..2")
    if not 0.0 < sampling.get("top_p", 0.0) <= 1.0:
        raise errors.InvalidArgument("manifest.sampling.top_p", "must be in (0, 1]")
    for field in ("cost_per_1k_input_tokens", "cost_per_1k_output_tokens"):
        if manifest.get(field, 0.0) < 0:
            raise errors.InvalidArgument(f"manifest.{field}", "must not be negative")


def _validate_files(field: str, files: list[dict[str, Any]]) -> None:
    """Files pinned by content: a plain file name (no path), a sha256 digest, a size."""
    names = set()
    for index, ref in enumerate(files):
        where = f"manifest.{field}[{index}]"
        if not FILE_NAME.match(ref.get("name", "")):
            raise errors.InvalidArgument(
                f"{where}.name", "must be 1-128 characters of A-Z a-z 0-9 . _ - (no path)"
            )
        if ref["name"] in names:
            raise errors.InvalidArgument(f"{where}.name", f"{ref['name']!r} appears twice")
        names.add(ref["name"])
        if not DIGEST.match(ref.get("digest", "")):
            raise errors.InvalidArgument(f"{where}.digest", "must be sha256: and 64 hex digits")
        if int(ref.get("size_bytes", 0)) < 0:
            raise errors.InvalidArgument(f"{where}.size_bytes", "must not be negative")


@dataclass(frozen=True)
class ModelRef:
    """A client's model reference split up: exactly one of alias or version_id is set."""

    name: str
    alias: str = ""
    version_id: str = ""


def parse_ref(ref: str, field: str = "model") -> ModelRef:
    """`name` (production), `name@alias` or `name@sha256:<hex>`."""
    name, sep, target = ref.partition("@")
    if not MODEL_NAME.match(name):
        raise errors.InvalidArgument(
            field, "must be a model name (a-z, 0-9, '.', '_', '-'; at most 64), optionally @alias"
        )
    if not sep:
        return ModelRef(name, alias="production")
    if target.startswith("sha256:"):
        if not VERSION_ID.match(target):
            raise errors.InvalidArgument(field, "a pinned version is sha256: and 64 hex digits")
        return ModelRef(name, version_id=target)
    if not ALIAS.match(target):
        raise errors.InvalidArgument(field, "alias must be a-z, 0-9 and '-', at most 32")
    return ModelRef(name, alias=target)
