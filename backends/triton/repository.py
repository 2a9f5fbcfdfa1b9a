"""Writes one registered version's Triton model into a model repository, from its manifest.

A model repository is deployment data: which weights (by digest), which tokenizer, how large a
KV cache. TensorRT-LLM fills its `config.pbtxt` templates from such values with
`fill_template.py`; this does the same for our engines, so each version is its own Triton model
(named by `services.registry.manifest.served_model_name`) and its Python model learns what to
serve from its config, materializing it from verified blobs when Triton loads it.

- `torch`: `model_repository/torch/` rendered from the manifest (weights and tokenizer by
  digest, KV geometry, dtype); the blobs are read from `blob_dir` (the replica's blob cache).
- `reference`: the shipped reference engine under the version's name; it loads no weights.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import string
from collections.abc import Mapping
from typing import Any

__all__ = ["REFERENCE_MODEL_DIR", "TEMPLATE_DIR", "link_model", "render_reference_model",
           "render_torch_model", "render_version"]

MODEL_REPOSITORY = pathlib.Path(__file__).parent / "model_repository"
TEMPLATE_DIR = MODEL_REPOSITORY / "torch"
REFERENCE_MODEL_DIR = MODEL_REPOSITORY / "reference"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _pbtxt_string(value: str) -> str:
    """`value` escaped for the inside of a protobuf text-format string literal."""
    return json.dumps(value)[1:-1]


def _model_dir(repository: pathlib.Path, name: str) -> pathlib.Path:
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '.' or '-'")
    return repository / name


def render_torch_model(
    repository: pathlib.Path,
    name: str,
    manifest: Mapping[str, Any],
    blob_dir: pathlib.Path,
    cache_dir: pathlib.Path,
    device: str = "",
    threads: int = 0,
) -> pathlib.Path:
    """Writes `<repository>/<name>/` (config.pbtxt and 1/model.py); returns it.

    `manifest` is the version's manifest dict (proto field names). Every KV-cache figure must be
    set: the engine never sizes its cache from host memory.
    """
    engine = manifest["engine"]
    for field in ("num_blocks", "page_size", "max_batch_tokens"):
        if int(engine.get(field, 0)) < 1:
            raise ValueError(f"manifest.engine.{field} must be set for the torch engine")
    values = {
        "triton_model_name": name,
        "max_batch_size": str(max(1, int(engine.get("max_batch_size", 0)))),
        "blob_dir": str(blob_dir.resolve()),
        "cache_dir": str(cache_dir.resolve()),
        "weights": json.dumps(manifest.get("weights", [])),
        "tokenizer_files": json.dumps(manifest.get("tokenizer_files", [])),
        "num_blocks": str(engine["num_blocks"]),
        "page_size": str(engine["page_size"]),
        "max_batch_tokens": str(engine["max_batch_tokens"]),
        "dtype": engine.get("dtype") or "float32",
        "device": device,
        "threads": str(threads),
    }
    template = string.Template((TEMPLATE_DIR / "config.pbtxt.template").read_text())
    config = template.substitute({key: _pbtxt_string(value) for key, value in values.items()})
    target = _model_dir(repository, name)
    (target / "1").mkdir(parents=True, exist_ok=True)
    (target / "config.pbtxt").write_text(config)
    shutil.copy2(TEMPLATE_DIR / "1" / "model.py", target / "1" / "model.py")
    return target


def render_reference_model(
    repository: pathlib.Path, name: str, parameters: Mapping[str, str] | None = None
) -> pathlib.Path:
    """The reference engine as the Triton model `name`, with the config.pbtxt `parameters` given
    (e.g. calibrated physics: `prefill_us_per_token`, `decode_step_ms`, ...) replacing the
    shipped values."""
    config = (REFERENCE_MODEL_DIR / "config.pbtxt").read_text()
    for key, value in (parameters or {}).items():
        block = f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        pattern = re.compile(
            rf'parameters: \{{\n  key: "{re.escape(key)}"\n'
            rf'  value: \{{ string_value: "[^"]*" \}}\n\}}\n'
        )
        config, found = pattern.subn(block.replace("\\", "\\\\"), config)
        if not found:
            config += block
    target = _model_dir(repository, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(REFERENCE_MODEL_DIR / "1", target / "1",
                    ignore=shutil.ignore_patterns("__pycache__"))
    named, count = re.subn(r'^name: "[^"]*"$', f'name: "{name}"', config, flags=re.M)
    if count != 1:
        raise ValueError("the reference config.pbtxt must name its model once")
    (target / "config.pbtxt").write_text(named)
    return target


def render_version(
    repository: pathlib.Path,
    name: str,
    manifest: Mapping[str, Any],
    blob_dir: pathlib.Path,
    cache_dir: pathlib.Path,
) -> pathlib.Path:
    """The Triton model `name` serving the version `manifest` describes, by its engine kind."""
    kind = manifest["engine"].get("kind", "")
    if kind == "torch":
        return render_torch_model(repository, name, manifest, blob_dir, cache_dir)
    if kind == "reference":
        return render_reference_model(repository, name)
    raise ValueError(f"manifest.engine.kind {kind!r}: no engine renders it")


def link_model(repository: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """Adds a ready model folder (e.g. the reference engine's) to `repository` by a symlink."""
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / source.name
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return target
        raise FileExistsError(f"{target} already exists and is not {source}")
    os.symlink(source.resolve(), target, target_is_directory=True)
    return target
