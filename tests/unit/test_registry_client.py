"""Reading what `meshctl registry push` sends: a model directory or a manifest file, with the
pinned files hashed, checked against what the manifest states, and found or required."""

import json
import pathlib

import pytest

from services.common import errors
from services.registry.blobs import file_digest
from services.registry.client import load_push_source

MANIFEST = {
    "name": "m", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 64, "max_output_tokens": 8},
    "sampling": {"max_tokens": 8, "top_p": 1.0},
}


def write(directory: pathlib.Path, manifest: dict) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_a_directory_fills_in_digests_and_sizes(tmp_path):
    (tmp_path / "engine.plan").write_bytes(b"e" * 1000)
    (tmp_path / "copy.plan").write_bytes(b"e" * 1000)  # the same bytes under a second name
    source = load_push_source(str(write(tmp_path, dict(
        MANIFEST, weights=[{"name": "engine.plan"}, {"name": "copy.plan"}]))))
    digest, size = file_digest(tmp_path / "engine.plan")
    assert [(w.name, w.digest, w.size_bytes) for w in source.manifest.weights] == [
        ("engine.plan", digest, size), ("copy.plan", digest, size)]
    assert len(source.files) == 1 and source.total_bytes == 1000  # uploaded once


def test_a_local_file_must_match_what_the_manifest_states(tmp_path):
    (tmp_path / "engine.plan").write_bytes(b"e" * 10)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(errors.InvalidArgument) as digest:
        load_push_source(str(write(tmp_path, dict(
            MANIFEST, weights=[{"name": "engine.plan", "digest": wrong}]))))
    assert digest.value.field == "manifest.weights[0].digest"
    with pytest.raises(errors.InvalidArgument) as size:
        load_push_source(str(write(tmp_path, dict(
            MANIFEST, weights=[{"name": "engine.plan", "size_bytes": "11"}]))))
    assert size.value.field == "manifest.weights[0].size_bytes"


def test_a_file_not_here_needs_its_digest_and_size(tmp_path):
    manifest_path = write(tmp_path, dict(MANIFEST, tokenizer_files=[{"name": "tokenizer.json"}]))
    with pytest.raises(errors.InvalidArgument) as missing:
        load_push_source(str(manifest_path / "manifest.json"))
    assert missing.value.field == "manifest.tokenizer_files[0]"
    pinned = {"name": "tokenizer.json", "digest": "sha256:" + "1" * 64, "size_bytes": "3"}
    source = load_push_source(str(write(tmp_path, dict(MANIFEST, tokenizer_files=[pinned]))))
    assert source.files == [] and source.manifest.tokenizer_files[0].size_bytes == 3


def test_unreadable_manifests_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    for path, field in [(tmp_path / "bad.json", "manifest"), (tmp_path / "none", "source")]:
        with pytest.raises(errors.InvalidArgument) as refused:
            load_push_source(str(path))
        assert refused.value.field == field
    (tmp_path / "unknown.json").write_text(json.dumps(dict(MANIFEST, colour="blue")))
    with pytest.raises(errors.InvalidArgument) as unknown:
        load_push_source(str(tmp_path / "unknown.json"))
    assert "colour" in unknown.value.message
