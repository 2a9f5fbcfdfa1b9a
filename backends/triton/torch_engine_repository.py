"""Writes the torch engine's Triton model for one model version, from the version's manifest.

A model repository is deployment data: which weights (by digest), which tokenizer, how large a
KV cache. TensorRT-LLM fills its `config.pbtxt` templates from such values with
`fill_template.py`; this does the same for the torch engine, so the Python model learns what to
serve from its config and materializes it from verified blobs when Triton loads it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import string
from typing import Any

__all__ = ["TEMPLATE_DIR", "link_model", "render_torch_model"]

TEMPLATE_DIR = pathlib.Path(__file__).parent / "model_repository" / "torch"


def _pbtxt_string(value: str) -> str:
    """`value` escaped for the inside of a protobuf text-format string literal."""
    return json.dumps(value)[1:-1]


def render_torch_model(
    repository: pathlib.Path,
    manifest: dict[str, Any],
    blob_dir: pathlib.Path,
    cache_dir: pathlib.Path,
    device: str = "",
    threads: int = 0,
) -> pathlib.Path:
    """Writes `<repository>/<triton_model_name>/` (config.pbtxt and 1/model.py); returns it.

    `manifest` is the version's manifest dict (proto field names). Every KV-cache figure must be
    set: the engine never sizes its cache from host memory.
    """
    engine = manifest["engine"]
    for field in ("num_blocks", "page_size", "max_batch_tokens"):
        if int(engine.get(field, 0)) < 1:
            raise ValueError(f"manifest.engine.{field} must be set for the torch engine")
    name = manifest["triton_model_name"]
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
    target = repository / name
    (target / "1").mkdir(parents=True, exist_ok=True)
    (target / "config.pbtxt").write_text(config)
    shutil.copy2(TEMPLATE_DIR / "1" / "model.py", target / "1" / "model.py")
    return target


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
