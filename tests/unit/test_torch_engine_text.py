"""The torch engine's pure parts: incremental detokenization, seeded noise keys, the rendered
Triton model config."""

from __future__ import annotations

import json
import pathlib

import pytest

from backends.triton.repository import render_torch_model, render_version
from backends.triton.torch_engine import IncrementalDetokenizer, noise_key

# A byte-level vocabulary, as GPT-2-style BPE has: a token may hold part of a UTF-8 character.
VOCAB = {1: b"Hel", 2: b"lo", 3: b" caf", 4: b"\xc3", 5: b"\xa9", 6: b" ST", 7: b"OP", 8: b"!"}


def decode(ids) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def run(ids, stop=()):
    detokenizer = IncrementalDetokenizer(decode, tuple(stop))
    deltas = [detokenizer.push(ids[: n + 1]) for n in range(len(ids))]
    return deltas, detokenizer.finish(ids), detokenizer.stopped


def test_a_character_split_across_tokens_is_held_until_complete():
    deltas, rest, stopped = run([1, 2, 3, 4, 5, 8])
    assert deltas == ["Hel", "lo", " caf", "", "é", "!"]
    assert rest == "" and not stopped
    assert all("\ufffd" not in d for d in deltas)


def test_text_ends_before_a_stop_string_split_across_tokens():
    deltas, rest, stopped = run([1, 2, 6, 7, 8], stop=("STOP",))
    assert deltas == ["Hel", "lo", " ", "", ""]  # "ST" held back: it may start "STOP"
    assert rest == "" and stopped


def test_held_back_text_comes_out_when_the_request_ends():
    deltas, rest, stopped = run([1, 2, 6], stop=("STOP",))
    assert "".join(deltas) == "Hello " and rest == "ST" and not stopped


def test_noise_keys_are_stable_nonzero_and_differ_by_step():
    keys = [noise_key(7, step) for step in range(100)]
    assert keys == [noise_key(7, step) for step in range(100)]
    assert all(0 < k < 2**30 for k in keys) and len(set(keys)) > 95
    assert noise_key(8, 0) != noise_key(7, 0)


def test_the_rendered_config_carries_the_manifest_escaped(tmp_path: pathlib.Path):
    weights = [{"name": "m.gguf", "digest": "sha256:" + "a" * 64}]
    manifest = {"weights": weights, "tokenizer_files": [],
                "engine": {"num_blocks": 16, "page_size": 32, "max_batch_tokens": 64,
                           "max_batch_size": 4}}
    folder = render_torch_model(tmp_path / "repo", "smol", manifest, tmp_path / 'b"lobs',
                                tmp_path)
    config = (folder / "config.pbtxt").read_text()
    assert 'name: "smol"' in config and "max_batch_size: 4" in config
    assert 'string_value: "16"' in config and 'b\\"lobs' in config
    encoded = config.split('key: "weights", value: { string_value: "')[1].split('" }')[0]
    assert json.loads(json.loads(f'"{encoded}"')) == weights
    assert (folder / "1" / "model.py").is_file()


def test_an_unsized_kv_cache_is_refused(tmp_path: pathlib.Path):
    manifest = {"engine": {"num_blocks": 0, "page_size": 32, "max_batch_tokens": 64}}
    with pytest.raises(ValueError, match="num_blocks"):
        render_torch_model(tmp_path, "smol", manifest, tmp_path, tmp_path)


def test_each_engine_kind_renders_its_own_model_under_the_version_name(tmp_path: pathlib.Path):
    reference = render_version(tmp_path, "demo-0123456789ab", {"engine": {"kind": "reference"}},
                               tmp_path, tmp_path)
    assert 'name: "demo-0123456789ab"' in (reference / "config.pbtxt").read_text()
    assert (reference / "1" / "model.py").is_file()
    with pytest.raises(ValueError, match="kind"):
        render_version(tmp_path, "x", {"engine": {"kind": "tensorrt"}}, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="model name"):
        render_version(tmp_path, "../escape", {"engine": {"kind": "reference"}}, tmp_path,
                       tmp_path)


@pytest.mark.parametrize("stop", [(), ("STOP",), ("zz", "fé S"), ("o ca",)])
def test_a_continuation_detokenizer_fed_the_ids_at_once_holds_what_the_original_held(stop):
    """Ids pushed one at a time release the same text however they are grouped into calls of
    `push_each`: a continuation's detokenizer, given at once the ids the client received, holds
    back what the original held and goes on exactly where the client's text stopped."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    for cut in range(1, len(ids)):
        original = IncrementalDetokenizer(decode, stop)
        released = "".join(original.push_each(ids[:n], n - 1) for n in range(1, cut + 1))
        continued = IncrementalDetokenizer(decode, stop)
        assert continued.push_each(ids[:cut], 0) == released
        if original.stopped:
            assert continued.stopped
            continue
        rest_original = "".join(original.push(ids[:n]) for n in range(cut + 1, len(ids) + 1))
        rest_continued = "".join(continued.push(ids[:n]) for n in range(cut + 1, len(ids) + 1))
        assert rest_continued == rest_original
        assert continued.finish(ids) == original.finish(ids)
