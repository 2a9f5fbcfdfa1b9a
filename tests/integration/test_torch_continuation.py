"""The torch engine's continuation on the real model (issue 22): a greedy and a seeded (0.8)
generation are cut after some of their tokens; continuations given the ids the client received
and the max_tokens left send exactly the rest of the uncut text, token for token (float32, where
a batch's shape does not flip near-ties). One request at a time: a batch of two runs ~10x slower
per token than two requests alone on a loaded 2-core machine (measured 63 s against 14 s)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from backends.triton.torch_engine import Delta, Generation, Sampling, TorchEngine, TorchEngineConfig
from tests.e2e.model_variants import demo_model_dir

pytestmark = pytest.mark.integration
TOKENS = 16
QUESTION = "Write a short story about a lighthouse keeper and a storm."
# min_tokens: no early end, and it counts from the original's start in a continuation too.
SAMPLINGS = {"greedy": Sampling(min_tokens=TOKENS),
             "seeded": Sampling(temperature=0.8, seed=1234, min_tokens=TOKENS)}


@pytest.fixture(scope="module")
def engine() -> Iterator[TorchEngine]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = demo_model_dir()
    running = TorchEngine(model_dir, model_dir, TorchEngineConfig(
        num_blocks=128, page_size=32, max_batch_tokens=256, dtype="float32"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def prompt() -> str:
    """The question as the gateway renders it (the model's chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model_dir())).apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)


def _run(engine: TorchEngine, generations: list[Generation]) -> dict[str, list[Delta]]:
    for generation in generations:
        engine.submit(generation)
    deltas: dict[str, list[Delta]] = {g.request_id: [] for g in generations}
    deadline = time.monotonic() + 120
    while any(not d or d[-1].finish_reason is None for d in deltas.values()):
        assert time.monotonic() < deadline, "the engine did not finish in 120 s"
        for delta in engine.poll(0.1):
            assert not delta.error, delta.error
            deltas[delta.request_id].append(delta)
    return deltas


def test_a_continuation_sends_the_rest_of_the_uncut_text(engine: TorchEngine, prompt: str):
    whole = {}
    for name, sampling in SAMPLINGS.items():
        whole.update(_run(engine, [Generation(name, prompt, TOKENS, sampling,
                                              stop=("\n\n\n",))]))
    continuations, delivered = [], {}
    for name, sampling in SAMPLINGS.items():
        deltas = whole[name]
        assert sum(len(d.token_ids) for d in deltas) == deltas[-1].num_output_tokens
        # What the gateway received when the stream broke: the responses carrying text (the
        # engine sends the ids of a held-back delta with the next one that carries text).
        cut = len(deltas) // 2
        while not deltas[cut - 1].text:
            cut -= 1
        ids = tuple(t for d in deltas[:cut] for t in d.token_ids)
        delivered[name] = ("".join(d.text for d in deltas[:cut]), ids)
        continuations.append(Generation(f"{name}-rest", prompt, TOKENS - len(ids), sampling,
                                        stop=("\n\n\n",), continued=ids))
    rest = {}
    for continuation in continuations:
        rest.update(_run(engine, [continuation]))
    for name in SAMPLINGS:
        text, ids = delivered[name]
        original = whole[name]
        after = rest[f"{name}-rest"]
        assert text + "".join(d.text for d in after) == "".join(d.text for d in original), name
        assert [t for d in after for t in d.token_ids] == [
            t for d in original for t in d.token_ids][len(ids):], name
        assert after[-1].num_output_tokens == original[-1].num_output_tokens - len(ids)
        assert after[-1].finish_reason is original[-1].finish_reason
