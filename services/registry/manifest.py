"""Model manifests: validation, canonical form and the content-addressed version id.

A manifest is handled as the dict of its protobuf JSON form (proto field names, every field
present; 64-bit sizes are strings there, as proto3 JSON writes them). The version id is
`sha256:` + the hex digest of its canonical JSON: fields at their default value left out, keys
sorted, no whitespace. Leaving defaults out keeps every existing id stable when a later schema
adds a field; any real change, even to the description, makes a new version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from services.common import errors
from services.registry.blobs import DIGEST

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOKENIZERS = ("whitespace", "huggingface")
ENGINE_KINDS = ("torch", "reference")
SHORT_ID_HEX = 12  # hex digits of the version id in its Triton model's name
# "" = the engine's default; "auto" = bfloat16 where the CPU computes it natively, else float32
DTYPES = ("", "auto", "float32", "bfloat16", "float16", "fp8", "int8", "int4")
ALIASES = ("production", "canary", "shadow", "previous")
FILE_GROUPS = ("weights", "tokenizer_files")
MAX_DESCRIPTION_CHARS = 4096
MAX_FILES = 1024
MAX_BLOCKED_PHRASES = 256
MAX_PHRASE_CHARS = 128
MAX_COST_PER_1K = 1_000_000.0
# (field, low, high) for the engine's integer settings; 0 = not set (the engine's own default,
# or no paged KV cache at all, as for the reference engine).
ENGINE_LIMITS = (
    ("max_batch_size", 0, 4096),
    ("num_blocks", 0, 1_048_576),
    ("page_size", 0, 1_048_576),
    ("max_batch_tokens", 0, 1_048_576),
    ("tensor_parallelism", 0, 64),
    ("gpu_memory_mib", 0, 16_777_216),
)


@dataclass(frozen=True)
class ModelVersion:
    """One immutable registered version: its id, the manifest dict and who registered it when."""

    version_id: str
    manifest: dict[str, Any]
    registered_at: float = 0.0  # unix seconds
    registered_by: str = ""

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def triton_model_name(self) -> str:
        """The Triton model serving exactly this version (see `served_model_name`)."""
        return served_model_name(self.name, self.version_id)

    @property
    def engine_kind(self) -> str:
        return self.manifest["engine"].get("kind", "")

    @property
    def tokenizer(self) -> str:
        return self.manifest["tokenizer"]

    @property
    def engine(self) -> dict[str, Any]:
        return self.manifest["engine"]

    @property
    def context_window(self) -> int:
        return self.manifest["engine"]["context_window"]

    @property
    def max_output_tokens(self) -> int:
        return self.manifest["engine"]["max_output_tokens"]

    @property
    def sampling(self) -> dict[str, Any]:
        return self.manifest["sampling"]

    @property
    def weights(self) -> list[dict[str, Any]]:
        """What the engine loads: `{"name", "digest", "size_bytes"}` each."""
        return list(self.manifest.get("weights", ()))

    @property
    def tokenizer_files(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("tokenizer_files", ()))

    @property
    def blocked_phrases(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("safety", {}).get("blocked_phrases", ()))

    @property
    def cost_per_1k_input_tokens(self) -> float:
        return float(self.manifest.get("cost_per_1k_input_tokens", 0.0))

    @property
    def cost_per_1k_output_tokens(self) -> float:
        return float(self.manifest.get("cost_per_1k_output_tokens", 0.0))


def served_model_name(name: str, version_id: str) -> str:
    """`<name>-<first 12 hex digits of the version id>`: each version is its own Triton model,
    so two versions of one model load side by side and a route can only reach the bytes its
    version pins. 48 bits of the digest: a clash among one model's versions is negligible."""
    return f"{name}-{version_id.removeprefix('sha256:')[:SHORT_ID_HEX]}"


def _is_default(value: Any) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def sparse(value: Any) -> Any:
    """The value with every default-valued field left out (recursively), as proto3 JSON does."""
    if isinstance(value, dict):
        kept = {key: sparse(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if not _is_default(item)}
    if isinstance(value, list):
        return [sparse(item) for item in value]
    return value


def canonical_json(manifest: dict[str, Any]) -> bytes:
    return json.dumps(
        sparse(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False,
    ).encode()


def version_id(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def flatten(manifest: dict[str, Any]) -> dict[str, Any]:
    """Dotted field paths → values; pinned files keyed by name (`weights[model.gguf].digest`),
    so two versions compare field by field."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list) and prefix in FILE_GROUPS:
            for ref in value:
                for key, item in ref.items():
                    if key != "name":
                        flat[f"{prefix}[{ref.get('name', '')}].{key}"] = item
        else:
            flat[prefix] = value

    walk("", manifest)
    return flat


def diff_manifests(
    before: dict[str, Any], after: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(field, before, after) for every field that differs; None where a side lacks it."""
    old, new = flatten(before), flatten(after)
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Refuses a manifest that could not be served; errors name the field and the limit."""
    if not MODEL_NAME.match(manifest.get("name", "")):
        raise errors.InvalidArgument(
            "manifest.name", "must be 1-64 characters of a-z, 0-9, '.', '_' and '-'"
        )
    if len(manifest.get("description", "")) > MAX_DESCRIPTION_CHARS:
        raise errors.InvalidArgument(
            "manifest.description", f"must be at most {MAX_DESCRIPTION_CHARS} characters"
        )
    tokenizer = manifest.get("tokenizer", "")
    if tokenizer not in TOKENIZERS:
        raise errors.InvalidArgument("manifest.tokenizer", f"must be one of {TOKENIZERS}")
    _validate_engine(manifest.get("engine", {}))
    _validate_sampling(manifest.get("sampling", {}), manifest["engine"]["max_output_tokens"])
    for field in ("cost_per_1k_input_tokens", "cost_per_1k_output_tokens"):
        cost = manifest.get(field, 0.0)
        if not (math.isfinite(cost) and 0.0 <= cost <= MAX_COST_PER_1K):
            raise errors.InvalidArgument(f"manifest.{field}", f"must be 0..{MAX_COST_PER_1K:g}")
    for group in FILE_GROUPS:
        _validate_files(group, manifest.get(group, []))
    if manifest["engine"]["kind"] == "torch" and not manifest.get("weights"):
        raise errors.InvalidArgument("manifest.weights", "the torch engine needs its weights")
    if tokenizer == "huggingface" and "tokenizer.json" not in {
        f["name"] for f in manifest.get("tokenizer_files", [])
    }:
        raise errors.InvalidArgument(
            "manifest.tokenizer_files", "a huggingface tokenizer needs a tokenizer.json"
        )
    phrases = manifest.get("safety", {}).get("blocked_phrases", [])
    if len(phrases) > MAX_BLOCKED_PHRASES:
        raise errors.InvalidArgument(
            "manifest.safety.blocked_phrases", f"at most {MAX_BLOCKED_PHRASES} entries"
        )
    for index, phrase in enumerate(phrases):
        if not phrase.strip() or len(phrase) > MAX_PHRASE_CHARS:
            raise errors.InvalidArgument(
                f"manifest.safety.blocked_phrases[{index}]",
                f"must be 1..{MAX_PHRASE_CHARS} characters, not blank",
            )


def _validate_engine(engine: dict[str, Any]) -> None:
    context_window = engine.get("context_window", 0)
    if not 1 <= context_window <= 1_048_576:
        raise errors.InvalidArgument("manifest.engine.context_window", "must be 1..1048576")
    if not 1 <= engine.get("max_output_tokens", 0) <= context_window:
        raise errors.InvalidArgument(
            "manifest.engine.max_output_tokens", f"must be 1..context_window ({context_window})"
        )
    for field, low, high in ENGINE_LIMITS:
        if not low <= engine.get(field, 0) <= high:
            raise errors.InvalidArgument(f"manifest.engine.{field}", f"must be {low}..{high}")
    if bool(engine.get("num_blocks", 0)) != bool(engine.get("page_size", 0)):
        raise errors.InvalidArgument(
            "manifest.engine.page_size", "num_blocks and page_size are set together or not at all"
        )
    cache_tokens = engine.get("num_blocks", 0) * engine.get("page_size", 0)
    if cache_tokens and cache_tokens < context_window:
        raise errors.InvalidArgument(
            "manifest.engine.num_blocks",
            f"num_blocks × page_size ({cache_tokens} tokens) must hold one full "
            f"context_window ({context_window})",
        )
    if engine.get("kind", "") not in ENGINE_KINDS:
        raise errors.InvalidArgument("manifest.engine.kind", f"must be one of {ENGINE_KINDS}")
    if engine.get("dtype", "") not in DTYPES:
        raise errors.InvalidArgument("manifest.engine.dtype", f"must be one of {DTYPES}")


def _validate_sampling(sampling: dict[str, Any], max_output_tokens: int) -> None:
    if not 1 <= sampling.get("max_tokens", 0) <= max_output_tokens:
        raise errors.InvalidArgument(
            "manifest.sampling.max_tokens",
            f"must be 1..engine.max_output_tokens ({max_output_tokens})",
        )
    if not 0.0 <= sampling.get("temperature", 0.0) <= 2.0:
        raise errors.InvalidArgument("manifest.sampling.temperature", "must be 0..2")
    if not 0.0 < sampling.get("top_p", 0.0) <= 1.0:
        raise errors.InvalidArgument("manifest.sampling.top_p", "must be in (0, 1]")
    if not 0 <= sampling.get("top_k", 0) <= 1000:
        raise errors.InvalidArgument("manifest.sampling.top_k", "must be 0..1000 (0: off)")


def _validate_files(group: str, files: list[dict[str, Any]]) -> None:
    """Files pinned by content: a plain file name (no path), a sha256 digest, a size."""
    if len(files) > MAX_FILES:
        raise errors.InvalidArgument(f"manifest.{group}", f"at most {MAX_FILES} files")
    names: set[str] = set()
    for index, ref in enumerate(files):
        where = f"manifest.{group}[{index}]"
        name = ref.get("name", "")
        if not FILE_NAME.match(name):
            raise errors.InvalidArgument(
                f"{where}.name", "must be 1-128 characters of A-Z a-z 0-9 . _ - (no path)"
            )
        if name in names:
            raise errors.InvalidArgument(f"{where}.name", f"{name!r} appears twice")
        names.add(name)
        if not DIGEST.match(ref.get("digest", "")):
            raise errors.InvalidArgument(
                f"{where}.digest", "must be sha256: followed by 64 lowercase hex digits"
            )
        if int(ref.get("size_bytes", 0)) < 0:
            raise errors.InvalidArgument(f"{where}.size_bytes", "must not be negative")


@dataclass(frozen=True)
class ModelRef:
    """A client's model reference split up: exactly one of alias or version_id is set.

    `explicit` tells `name@production` (exactly production) from a bare `name` (the rollout:
    production, or the canary for the tenants/users it is assigned to).
    """

    name: str
    alias: str = ""
    version_id: str = ""
    explicit: bool = False


def parse_ref(ref: str, field: str = "model") -> ModelRef:
    """`name` (the rollout), `name@<alias>` or `name@sha256:<hex>`."""
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
        return ModelRef(name, version_id=target, explicit=True)
    if target not in ALIASES:
        raise errors.InvalidArgument(field, f"the alias after '@' must be one of {ALIASES}")
    return ModelRef(name, alias=target, explicit=True)
