"""Manifest fields for engines with real weights: files pinned by digest, KV-cache sizing."""

import copy

import pytest

from services.common import errors
from services.registry.manifest import validate_manifest

DIGEST = "sha256:" + "ab" * 32
MANIFEST = {
    "name": "smol",
    "description": "",
    "tokenizer": "huggingface",
    "engine": {"kind": "torch", "context_window": 2048, "max_output_tokens": 512,
               "max_batch_size": 8,
               "num_blocks": 64, "page_size": 32, "max_batch_tokens": 256, "dtype": "float32"},
    "sampling": {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0},
    "cost_per_1k_input_tokens": 0.0,
    "cost_per_1k_output_tokens": 0.0,
    "weights": [{"name": "model.gguf", "digest": DIGEST, "size_bytes": "10"}],
    "tokenizer_files": [{"name": "tokenizer.json", "digest": DIGEST, "size_bytes": "3"}],
}


def test_a_complete_manifest_is_accepted():
    validate_manifest(copy.deepcopy(MANIFEST))


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda m: m["engine"].update(num_blocks=-1), "manifest.engine.num_blocks"),
        (lambda m: m["engine"].update(dtype="int3"), "manifest.engine.dtype"),
        (lambda m: m["weights"][0].update(name="../etc/passwd"), "manifest.weights[0].name"),
        (lambda m: m["weights"][0].update(digest="sha256:xyz"), "manifest.weights[0].digest"),
        (lambda m: m["weights"].append(dict(m["weights"][0])), "manifest.weights[1].name"),
        (lambda m: m["tokenizer_files"][0].update(name="vocab.txt"), "manifest.tokenizer_files"),
    ],
)
def test_bad_engine_files_name_the_field(edit, field):
    manifest = copy.deepcopy(MANIFEST)
    edit(manifest)
    with pytest.raises(errors.InvalidArgument) as raised:
        validate_manifest(manifest)
    assert raised.value.field == field
