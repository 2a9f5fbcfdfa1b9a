"""`meshctl registry push DIR` of a Hugging Face model directory: the manifest derived from the
model's own files, and every directory the torch engine could not serve refused, naming the
file, before anything is hashed or uploaded."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.common import errors
from services.registry.blobs import file_digest
from services.registry.client import load_push_source

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja")


def hf_dir(directory: pathlib.Path, config: dict | None = None, generation: dict | None = None,
           weights: tuple[str, ...] = ("model.safetensors",),
           tokenizer: tuple[str, ...] = TOKENIZER, index: dict | None = None) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(LLAMA if config is None else config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    for number, name in enumerate(weights):
        save_file({f"layer{number}.weight": np.zeros((64, 1024), np.float32)}, directory / name)
    if index is not None:
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in tokenizer:
        (directory / name).write_text(f"{name} contents")
    return directory


def names(refs) -> list[str]:
    return [ref.name for ref in refs]


def test_a_derived_manifest_takes_its_settings_from_the_model_files(tmp_path):
    directory = hf_dir(tmp_path / "SmolLM2 135M-Instruct", generation={
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40,
        "max_new_tokens": 4096})
    source = load_push_source(str(directory))
    manifest = source.manifest
    assert source.derived
    assert manifest.name == "smollm2-135m-instruct"
    assert manifest.tokenizer == "huggingface"
    engine = manifest.engine
    assert (engine.kind, engine.context_window, engine.max_output_tokens, engine.dtype) == (
        "torch", 4096, 512, "bfloat16")  # the window is the model's, up to the KV cache's
    assert (engine.num_blocks, engine.page_size, engine.max_batch_tokens,
            engine.max_batch_size) == (128, 32, 256, 8)
    sampling = manifest.sampling
    assert (sampling.max_tokens, sampling.top_k) == (512, 40)  # max_new_tokens capped
    assert sampling.temperature == pytest.approx(0.6) and sampling.top_p == pytest.approx(0.9)
    assert names(manifest.weights) == ["config.json", "generation_config.json",
                                       "model.safetensors"]
    assert names(manifest.tokenizer_files) == ["tokenizer.json", "tokenizer_config.json",
                                               "chat_template.jinja", "special_tokens_map.json"]
    digest, size = file_digest(directory / "model.safetensors")
    assert (manifest.weights[2].digest, manifest.weights[2].size_bytes) == (digest, size)
    assert len(source.files) == 7


def test_without_do_sample_or_a_known_dtype_it_is_greedy_float32(tmp_path):
    config = dict(LLAMA, torch_dtype="float64", max_position_embeddings=2048)
    directory = hf_dir(tmp_path / "m", config=config, tokenizer=TOKENIZER[:2],
                       generation={"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 64})
    manifest = load_push_source(str(directory), name="my-model").manifest
    assert manifest.name == "my-model"
    assert (manifest.engine.context_window, manifest.engine.dtype) == (2048, "float32")
    assert (manifest.sampling.max_tokens, manifest.sampling.temperature,
            manifest.sampling.top_p, manifest.sampling.top_k) == (64, 0.0, 1.0, 0)
    assert names(manifest.tokenizer_files) == ["tokenizer.json", "tokenizer_config.json"]
    no_generation = load_push_source(str(hf_dir(tmp_path / "n"))).manifest
    assert "generation_config.json" not in names(no_generation.weights)
    assert no_generation.sampling.max_tokens == 128


def test_a_sharded_model_pins_its_index_and_every_shard(tmp_path):
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}
    manifest = load_push_source(str(hf_dir(tmp_path / "m", weights=shards, index=index))).manifest
    assert names(manifest.weights) == ["config.json", "model.safetensors.index.json", *shards]


@pytest.mark.parametrize("files, field, words", [
    (dict(weights=("model-00001-of-00002.safetensors",), index={"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}),
     "model-00002-of-00002.safetensors", "model.safetensors.index.json lists"),
    (dict(weights=("pytorch_model.bin",)), "model.safetensors", "no .safetensors"),
    (dict(weights=("model-00001-of-00002.safetensors",)), "model.safetensors.index.json",
     "no model.safetensors.index.json"),
    (dict(tokenizer=("tokenizer_config.json",)), "tokenizer.json", "missing"),
    (dict(tokenizer=("tokenizer.json",)), "tokenizer_config.json", "missing"),
    (dict(config=dict(LLAMA, architectures=["FancyNetForCausalLM"])), "config.json",
     "'FancyNetForCausalLM' is not a causal language model"),
    (dict(config={"architectures": ["BertForMaskedLM"], "model_type": "bert",
                  "max_position_embeddings": 512}), "config.json", "BertForMaskedLM"),
    (dict(config=dict(LLAMA, quantization_config={"quant_method": "gptq"})), "config.json",
     "quantized"),
    (dict(config=dict(LLAMA, max_position_embeddings=None)), "config.json",
     "max_position_embeddings"),
])
def test_a_directory_the_engine_cannot_serve_is_refused_naming_the_file(
        tmp_path, files, field, words):
    with pytest.raises(errors.InvalidArgument) as refused:
        load_push_source(str(hf_dir(tmp_path / "m", **files)))
    assert refused.value.field == field
    assert words in refused.value.message


def test_a_directory_with_neither_a_manifest_nor_a_config_is_refused(tmp_path):
    with pytest.raises(errors.InvalidArgument) as refused:
        load_push_source(str(tmp_path))
    assert refused.value.field == "config.json" and "manifest.json" in refused.value.message


def test_names_come_from_the_directory_or_a_valid_name(tmp_path):
    directory = hf_dir(tmp_path / "__Qwen2.5  Coder!")
    assert load_push_source(str(directory)).manifest.name == "qwen2.5-coder"
    for bad in ("Upper", "a/b", ""):
        with pytest.raises(errors.InvalidArgument) as refused:
            load_push_source(str(directory), name=bad)
        assert refused.value.field == "--name"
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(errors.InvalidArgument) as manifest_named:
        load_push_source(str(tmp_path / "manifest.json"), name="x")
    assert manifest_named.value.field == "--name"


def test_the_memory_placement_reserves_counts_parameters_and_the_kv_cache_at_the_dtype(tmp_path):
    config = {**LLAMA, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256,
              "num_key_value_heads": 2}  # head_dim 64
    source = load_push_source(str(hf_dir(tmp_path / "m", config=config)))
    parameters = 64 * 1024 * 2  # bfloat16
    kv_cache = 2 * 2 * 2 * 64 * (128 * 32) * 2  # K and V, layers, kv heads, head_dim, tokens
    expected = -(-int((parameters + kv_cache) * 1.1) // 2**20) + 512
    assert source.manifest.engine.gpu_memory_mib == expected == 517


def test_weights_that_are_not_safetensors_are_refused_naming_the_file(tmp_path):
    directory = hf_dir(tmp_path / "m")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(errors.InvalidArgument) as refused:
        load_push_source(str(directory))
    assert refused.value.field == "model.safetensors"
