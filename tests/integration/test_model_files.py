"""The default model's files: verified blobs, the converted copy, and the gateway's tokenizer
matching transformers' own rendering and counts (the conversion is cached per machine)."""

from __future__ import annotations

import pathlib

import pytest

from backends.triton.weights import (
    DEFAULT_MODEL,
    cache_root,
    materialize_files,
    materialize_weights,
    publish_default_model,
)
from services.common import errors
from services.gateway.requests import ChatTurn
from services.gateway.tokenizers import HuggingFaceTokenizer
from services.registry.blobs import LocalBlobStore

pytestmark = pytest.mark.integration

CHATS = [
    (ChatTurn("user", "What is the capital of France?"),),
    (ChatTurn("system", "Answer in French."), ChatTurn("user", "Bonjour, ça va ? 😀")),
    (ChatTurn("user", "Hi"), ChatTurn("assistant", "Hello!"), ChatTurn("user", "Tell me more")),
]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    blobs = LocalBlobStore(tmp_path_factory.mktemp("blobs"))
    return blobs, publish_default_model(blobs, cache_root())


def test_the_gateway_tokenizer_renders_and_counts_as_transformers_does(published):
    from transformers import AutoTokenizer

    blobs, files = published
    directory = materialize_files(blobs, files.tokenizer_files, cache_root())
    ours = HuggingFaceTokenizer(directory)
    theirs = AutoTokenizer.from_pretrained(str(directory))
    for turns in CHATS:
        expected = theirs.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in turns],
            tokenize=False, add_generation_prompt=True)
        assert ours.render(turns) == expected
        assert ours.count(expected) == len(theirs(expected)["input_ids"])


def test_a_tampered_weights_blob_is_refused(published, tmp_path: pathlib.Path):
    blobs, files = published
    hex_digest = DEFAULT_MODEL.digest.split(":", 1)[1]
    tampered_store = LocalBlobStore(tmp_path / "store")
    copy = tampered_store.root / "sha256" / hex_digest
    copy.write_bytes((blobs.root / "sha256" / hex_digest).read_bytes()[:-1] + b"\0")
    with pytest.raises(errors.Internal, match="corrupt"):
        materialize_weights(tampered_store, files.weights, tmp_path / "cache")
    assert not (tmp_path / "cache" / "converted").exists()  # nothing was converted from it
