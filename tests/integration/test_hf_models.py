"""The demo model as people have it: a sharded Hugging Face directory, pinned as blobs, laid out
by `materialize_weights` and served by the torch engine in this process with the same greedy
answer as its GGUF; and the GGUF file itself pushed with a derived manifest."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from backends.triton.weights import (
    DEFAULT_MODEL,
    cache_root,
    materialize_files,
    materialize_weights,
)
from services.registry.blobs import LocalBlobStore, file_digest
from services.registry.client import load_push_source
from tests.e2e.model_variants import demo_model_dir, greedy_answer

pytestmark = pytest.mark.integration


def refs(blobs: LocalBlobStore, directory: pathlib.Path, names: list[str]) -> list[dict]:
    return [{"name": n, "digest": blobs.put_file(directory / n),
             "size_bytes": (directory / n).stat().st_size} for n in names]


def test_a_sharded_hugging_face_model_answers_as_its_gguf_does(tmp_path):
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    source = demo_model_dir()
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_torch_state_dict(load_file(source / "model.safetensors"), sharded,
                          max_shard_size="200MB")
    shutil.copyfile(source / "config.json", sharded / "config.json")
    weights = sorted(p.name for p in sharded.iterdir())
    assert "model.safetensors.index.json" in weights and len(weights) >= 4  # 2+ shards
    blobs = LocalBlobStore(tmp_path / "blobs")
    model_dir = materialize_weights(blobs, refs(blobs, sharded, weights), tmp_path / "cache")
    tokenizer_dir = materialize_files(
        blobs, refs(blobs, source, ["tokenizer.json", "tokenizer_config.json",
                                    "chat_template.jinja"]), tmp_path / "cache")
    assert greedy_answer(model_dir, tokenizer_dir=tokenizer_dir) == \
        "The capital of France is Paris."


def test_a_gguf_file_is_pushed_with_the_tokenizer_files_of_its_converted_copy():
    gguf = cache_root() / "models" / DEFAULT_MODEL.file_name
    source = load_push_source(str(gguf))
    manifest = source.manifest
    assert source.derived and manifest.name == "smollm2-135m-instruct.q4_1"
    assert [(w.name, w.digest) for w in manifest.weights] == [
        (DEFAULT_MODEL.file_name, DEFAULT_MODEL.digest)]
    assert [t.name for t in manifest.tokenizer_files] == [
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    converted = demo_model_dir()
    assert manifest.tokenizer_files[0].digest == file_digest(converted / "tokenizer.json")[0]
    assert (manifest.engine.kind, manifest.engine.context_window, manifest.engine.dtype) == (
        "torch", 4096, "float32")
    assert (manifest.sampling.temperature, manifest.sampling.max_tokens) == (0.0, 128)
