"""A model as people have it — a Hugging Face model directory or one GGUF file — and the
manifest derived from its own files, so pushing it needs no hand-written manifest.json.

Everything the torch engine could not serve is refused here, naming the file, before anything is
hashed, uploaded or registered: an architecture transformers does not know as a causal LM, no
safetensors, a shard the index lists that is not there, a missing tokenizer file. The derived
engine and sampling settings are the demo model's where the model's config says nothing:
128 KV blocks of 32 tokens, 256 tokens per step, 8 sequences. The accelerator memory placement
reserves for the model is estimated from the weights' parameter count and the KV cache's size at
the engine's dtype (`gpu_memory_mib`), so a pushed model is never placed where it cannot fit.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Any

from backends.triton.weights import (
    SAFETENSORS_INDEX,
    TOKENIZER_FILE_NAMES,
    cache_root,
    converted_copy,
    hf_weight_shards,
)
from services.common import errors
from services.registry.blobs import file_digest
from services.registry.manifest import DTYPES, MODEL_NAME

__all__ = ["DerivedSource", "from_gguf", "from_hf_directory", "model_name"]

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
# The tokenizer files pinned when present; the first two are required (the engine and the
# gateway both load the tokenizer from them).
TOKENIZER_FILES = (*TOKENIZER_FILE_NAMES, "special_tokens_map.json")
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
NUM_BLOCKS, PAGE_SIZE, MAX_BATCH_TOKENS, MAX_BATCH_SIZE = 128, 32, 256, 8
# What the engine needs beyond weights and KV cache (activations, the allocator's slack) as a
# fraction of them, and the CUDA context and kernels: a conservative estimate, never a measurement.
MEMORY_SLACK, RUNTIME_MIB = 0.10, 512
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # "auto" may stay float32
MAX_OUTPUT_TOKENS = 512  # a sane cap on one answer; a manifest.json can say otherwise
DEFAULT_MAX_TOKENS = 128  # when generation_config.json sets no max_new_tokens


@dataclass(frozen=True)
class DerivedSource:
    """A manifest derived from a model's files (proto JSON names; files by name only, their
    digests and sizes filled in when hashed) and where each file it pins lies here."""

    manifest: dict[str, Any]
    paths: dict[str, pathlib.Path]


def model_name(text: str) -> str:
    """`text` (a directory or file name) as a model name: lowercase, other characters → '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("._-")[:64].rstrip("._-")
    if not MODEL_NAME.match(name):
        raise errors.InvalidArgument(
            "--name", f"{text!r} makes no model name (a-z, 0-9, '.', '_', '-'): give --name"
        )
    return name


def from_hf_directory(directory: pathlib.Path, name: str | None = None) -> DerivedSource:
    """The manifest of a Hugging Face model directory (config.json, safetensors, tokenizer
    files). Blocking file I/O; imports transformers (its model mapping) to check the
    architecture."""
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise errors.InvalidArgument(
            CONFIG, f"{directory} holds neither manifest.json nor a Hugging Face model's {CONFIG}"
        )
    weights = [config_path]
    if (directory / GENERATION_CONFIG).is_file():
        weights.append(directory / GENERATION_CONFIG)
    weights += _safetensors(directory)
    for file_name in REQUIRED_TOKENIZER_FILES:
        if not (directory / file_name).is_file():
            raise errors.InvalidArgument(
                file_name, f"{directory / file_name} is missing: the engine and the gateway load "
                "the tokenizer from it"
            )
    tokenizer = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    origin = directory.resolve().name
    return _derive(model_name(origin) if name is None else name, origin, directory, weights,
                   tokenizer)


def from_gguf(path: pathlib.Path, name: str | None = None) -> DerivedSource:
    """The manifest of one GGUF file: its config and tokenizer files come from its converted
    copy (made once per machine, as for the default model), the weights are the file itself.
    Blocking: hashes the file and, the first time, converts it (torch, ~25 s for 135M)."""
    digest, _ = file_digest(path)
    try:
        converted = converted_copy(path, digest, cache_root())
    except errors.MeshError:
        raise
    except Exception as exc:  # transformers' own words for a file it cannot read
        raise errors.InvalidArgument(path.name, f"{path} does not load as a model: {exc}") from None
    tokenizer = [converted / n for n in TOKENIZER_FILES if (converted / n).is_file()]
    return _derive(model_name(path.stem) if name is None else name, path.name, converted,
                   [path], tokenizer)


def _memory_mib(config: dict[str, Any], safetensors: list[pathlib.Path], dtype: str) -> int:
    """Accelerator memory the torch engine needs for this model at `dtype`: its parameters (counted
    from the safetensors headers, not the files' sizes, which are in the stored dtype) plus a KV
    cache of NUM_BLOCKS × PAGE_SIZE tokens, with slack and the runtime's own share."""
    from safetensors import safe_open

    parameters = 0
    for path in safetensors:
        if not path.name.endswith(".safetensors"):
            continue  # the index
        try:
            with safe_open(path, framework="numpy") as tensors:
                parameters += sum(math.prod(tensors.get_slice(name).get_shape())
                                  for name in tensors.keys())  # noqa: SIM118 (not a dict)
        except Exception as exc:  # safetensors' own words for a file it cannot read
            raise errors.InvalidArgument(
                path.name, f"{path} is not a safetensors file: {exc}") from None
    element = DTYPE_BYTES.get(dtype, 4)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 0) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    layers = int(config.get("num_hidden_layers") or 0)
    kv_cache = 2 * layers * kv_heads * head_dim * NUM_BLOCKS * PAGE_SIZE * element
    needed = (parameters * element + kv_cache) * (1 + MEMORY_SLACK)
    return math.ceil(needed / 2**20) + RUNTIME_MIB


def _safetensors(directory: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors weights `from_pretrained` loads: the index and its shards, or one file."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(hf_weight_shards(index, SAFETENSORS_INDEX))
        for shard in shards:
            if not (directory / shard).is_file():
                raise errors.InvalidArgument(
                    shard, f"{SAFETENSORS_INDEX} lists {shard}, which is not in {directory}"
                )
        return [index, *(directory / shard for shard in shards)]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if any(directory.glob("*.safetensors")):
        raise errors.InvalidArgument(
            SAFETENSORS_INDEX, f"{directory} holds .safetensors shards but no {SAFETENSORS_INDEX}"
        )
    raise errors.InvalidArgument(
        "model.safetensors", f"{directory} holds no .safetensors weights (pickled .bin weights "
        "are not loaded)"
    )


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(path.name, f"{path} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise errors.InvalidArgument(path.name, f"{path} is not a JSON object")
    return value


def _check_architecture(config: dict[str, Any], path: pathlib.Path) -> str:
    """The architecture `AutoModelForCausalLM` builds; refused unless transformers knows it."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # the server installed without its engine extra
        raise errors.FailedPrecondition(
            f"{CONFIG}: checking a Hugging Face model's architecture needs transformers: "
            "install infermesh[engine]") from None

    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise errors.InvalidArgument(CONFIG, f"{path} names no architectures")
    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for architecture in architectures:
        if architecture not in known:
            raise errors.InvalidArgument(
                CONFIG, f"{path}: architecture {architecture!r} is not a causal language model "
                "this transformers knows, so the torch engine cannot load it"
            )
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise errors.InvalidArgument(
            CONFIG, f"{path}: model_type {config.get('model_type')!r} has no causal language "
            "model in this transformers"
        )
    if "quantization_config" in config:
        raise errors.InvalidArgument(
            CONFIG, f"{path} is a quantized checkpoint (quantization_config): the torch engine "
            "loads plain weights"
        )
    return architectures[0]


def _number(settings: dict[str, Any], key: str, default: float) -> float:
    value = settings.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else default


def _sampling(generation: dict[str, Any], max_output_tokens: int) -> dict[str, Any]:
    """generation_config.json's defaults, as transformers reads them: temperature, top_p and
    top_k only apply when do_sample is set (else greedy); each kept within the manifest's
    limits."""
    sample = generation.get("do_sample") is True
    max_new_tokens = int(_number(generation, "max_new_tokens", DEFAULT_MAX_TOKENS))
    top_p = _number(generation, "top_p", 1.0)
    return {
        "max_tokens": min(max(max_new_tokens, 1), max_output_tokens),
        "temperature": min(max(_number(generation, "temperature", 1.0), 0.0), 2.0)
        if sample else 0.0,
        "top_p": top_p if sample and 0.0 < top_p <= 1.0 else 1.0,
        "top_k": min(max(int(_number(generation, "top_k", 0)), 0), 1000) if sample else 0,
    }


def _derive(
    name: str, origin: str, config_dir: pathlib.Path, weights: list[pathlib.Path],
    tokenizer: list[pathlib.Path],
) -> DerivedSource:
    """The manifest from the model's config (in `config_dir`), pinning `weights` and
    `tokenizer`; `origin` (what was pushed) goes into the description."""
    if not MODEL_NAME.match(name):
        raise errors.InvalidArgument(
            "--name", "must be 1-64 characters of a-z, 0-9, '.', '_' and '-'"
        )
    config_path = config_dir / CONFIG
    config = _read_json(config_path)
    architecture = _check_architecture(config, config_path)
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(positions, int) or positions < 1:
        raise errors.InvalidArgument(
            CONFIG, f"{config_path} gives no max_position_embeddings (the context window)"
        )
    generation_path = config_dir / GENERATION_CONFIG
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    # The KV cache must hold one full context: the window is the model's, up to the cache.
    context_window = min(positions, NUM_BLOCKS * PAGE_SIZE)
    max_output_tokens = min(MAX_OUTPUT_TOKENS, context_window)
    dtype = config.get("torch_dtype", config.get("dtype"))
    dtype = dtype if dtype in DTYPES and dtype else "float32"
    files = {path.name: path for path in (*weights, *tokenizer)}
    manifest = {
        "name": name,
        "description": f"{architecture} from {origin} (manifest derived from its files)",
        "tokenizer": "huggingface",
        "engine": {
            "kind": "torch", "context_window": context_window,
            "max_output_tokens": max_output_tokens, "max_batch_size": MAX_BATCH_SIZE,
            "num_blocks": NUM_BLOCKS, "page_size": PAGE_SIZE,
            "max_batch_tokens": MAX_BATCH_TOKENS, "dtype": dtype,
            "gpu_memory_mib": _memory_mib(config, _safetensors(config_dir), dtype),
        },
        "sampling": _sampling(generation, max_output_tokens),
        "weights": [{"name": path.name} for path in weights],
        "tokenizer_files": [{"name": path.name} for path in tokenizer],
    }  # fmt: skip
    return DerivedSource(manifest, files)
