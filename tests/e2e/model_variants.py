"""A second version of the demo model, made by the tests, and what any version's weights answer
in this process: so a test can push two versions as people have them (Hugging Face directories)
and check that the mesh serves each one's own bytes.

The variant is `backends.triton.weights.write_variant` (the benchmarks push it too): the demo
model's converted copy with one layer changed deterministically (layer 10's MLP output
projection negated): its greedy answer to "What is the capital of France?" differs from the
original's ("The capital of France is Paris."), and it keeps the same tokenizer files, so only
the weights tell the two apart.
"""

from __future__ import annotations

import os
import pathlib
import time

from backends.triton import weights
from backends.triton.torch_engine import Generation, TorchEngine, TorchEngineConfig

__all__ = ["CHANGED_TENSOR", "QUESTION", "demo_model_dir", "greedy_answer", "write_variant"]

QUESTION = "What is the capital of France?"
CHANGED_TENSOR = weights.VARIANT_CHANGED_TENSOR


def demo_model_dir() -> pathlib.Path:
    """The demo model as a Hugging Face directory: its GGUF's converted copy (made once per
    machine; `make install` fetched the GGUF)."""
    return weights.default_model_dir(weights.cache_root())


def write_variant(target_dir: pathlib.Path) -> pathlib.Path:
    """Writes the variant into `target_dir` (created): config, generation config, tokenizer files
    as the demo model's, and `model.safetensors` with `CHANGED_TENSOR` negated. ~3 s, ~540 MB."""
    return weights.write_variant(target_dir, weights.cache_root())


def greedy_answer(model_dir: pathlib.Path, prompt: str = QUESTION, max_tokens: int = 32,
                  dtype: str = "float32", tokenizer_dir: pathlib.Path | None = None) -> str:
    """The project's torch engine, in this process, loaded from `model_dir` (and the tokenizer
    from `tokenizer_dir`, by default the same directory) with the demo manifest's KV cache,
    answering one user turn greedily, rendered with the model's chat template as the gateway
    renders it. Loads and stops its own engine (~3 s plus the decode)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer_dir = tokenizer_dir or model_dir
    text = AutoTokenizer.from_pretrained(str(tokenizer_dir)).apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    engine = TorchEngine(model_dir, tokenizer_dir, TorchEngineConfig(
        num_blocks=128, page_size=32, max_batch_tokens=256, dtype=dtype))
    engine.start()
    try:
        engine.submit(Generation("greedy", text, max_tokens))
        pieces: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for delta in engine.poll(0.1):
                if delta.error:
                    raise RuntimeError(f"the engine failed: {delta.error}")
                pieces.append(delta.text)
                if delta.finish_reason is not None:
                    return "".join(pieces)
        raise TimeoutError(f"no answer from {model_dir} within 300 s")
    finally:
        engine.stop()
