"""The torch engine's weights as a Hugging Face model (config.json and safetensors, sharded or
not): laid out from verified blobs in a directory `from_pretrained` loads, or refused naming the
file the engine could not load. (GGUF weights: tests/integration/test_model_files.py.)"""

from __future__ import annotations

import json
import pathlib

import pytest

from backends.triton.weights import materialize_weights
from services.common import errors
from services.registry.blobs import LocalBlobStore

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = {"metadata": {}, "weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}


def pinned(blobs: LocalBlobStore, scratch: pathlib.Path, files: dict[str, bytes]) -> list[dict]:
    """The files put into `blobs`, as a manifest pins them."""
    scratch.mkdir(exist_ok=True)
    refs = []
    for name, content in files.items():
        (scratch / name).write_bytes(content)
        refs.append({"name": name, "digest": blobs.put_file(scratch / name),
                     "size_bytes": str(len(content))})
    return refs


def sharded_model(index: dict = INDEX) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', "generation_config.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            SHARDS[0]: b"first shard", SHARDS[1]: b"second shard"}


def test_a_sharded_model_is_laid_out_under_its_names_once(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    files = sharded_model()
    weights = pinned(blobs, tmp_path / "scratch", files)
    directory = materialize_weights(blobs, weights, tmp_path / "cache")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
    assert directory.parent == tmp_path / "cache" / "files"
    assert materialize_weights(blobs, list(reversed(weights)), tmp_path / "cache") == directory


def test_one_safetensors_file_needs_no_index(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    weights = pinned(blobs, tmp_path / "scratch",
                     {"config.json": b"{}", "model.safetensors": b"tensors"})
    directory = materialize_weights(blobs, weights, tmp_path / "cache")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("drop, extra, field, words", [
    (SHARDS[1], {}, "weights[model.safetensors.index.json]", SHARDS[1]),
    ("config.json", {}, "weights", "config.json"),
    ("model.safetensors.index.json", {}, "weights", "model.safetensors or"),
    (None, {"pytorch_model.bin": b"pickle"}, "weights[pytorch_model.bin]", ".safetensors"),
    (None, {"modeling_custom.py": b"code"}, "weights[modeling_custom.py]", "config.json"),
])
def test_weights_the_engine_cannot_load_are_refused_naming_the_file(
        tmp_path, drop, extra, field, words):
    blobs = LocalBlobStore(tmp_path / "blobs")
    files = {name: content for name, content in sharded_model().items() if name != drop}
    weights = pinned(blobs, tmp_path / "scratch", {**files, **extra})
    with pytest.raises(errors.InvalidArgument) as refused:
        materialize_weights(blobs, weights, tmp_path / "cache")
    assert refused.value.field == field and words in refused.value.message


def test_an_index_that_is_not_one_is_refused(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    files = sharded_model()
    files["model.safetensors.index.json"] = b'{"weight_map": {"a": "../escape.safetensors"}}'
    with pytest.raises(errors.InvalidArgument) as refused:
        materialize_weights(blobs, pinned(blobs, tmp_path / "scratch", files), tmp_path / "c")
    assert refused.value.field == "weights[model.safetensors.index.json]"


def test_a_tampered_blob_is_refused_before_it_is_laid_out(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    weights = pinned(blobs, tmp_path / "scratch",
                     {"config.json": b"{}", "model.safetensors": b"tensors"})
    blob = blobs.root / "sha256" / weights[1]["digest"].removeprefix("sha256:")
    blob.write_bytes(b"tampered")
    with pytest.raises(errors.Internal, match="corrupt"):
        materialize_weights(blobs, weights, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "files").iterdir())
