"""The real torch engine's guided decoding, in process: the text follows the schema whatever the
sampling, a schema it cannot compile and tokens its grammar refuses are refusals, and a
continuation (mid-stream failover) picks the grammar up where the failed replica left it."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from backends.triton.torch_engine import Generation, Sampling, TorchEngine, TorchEngineConfig
from backends.triton.weights import cache_root, default_model_dir

pytestmark = pytest.mark.integration

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
PROMPT = ("<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def engine():
    model_dir = default_model_dir(cache_root())
    engine = TorchEngine(model_dir, model_dir, TorchEngineConfig(
        num_blocks=16, page_size=32, max_batch_tokens=256, threads=1))
    engine.start()
    yield engine
    engine.stop()


def texts(engine: TorchEngine, generations: list[Generation],
          timeout_s: float = 90.0) -> dict[str, tuple[str, str]]:
    """Each request's (text, finish_reason), run together in one batch."""
    for generation in generations:
        engine.submit(generation)
    pieces: dict[str, str] = {}
    ends: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(ends) < len(generations) and time.monotonic() < deadline:
        for delta in engine.poll(0.1):
            pieces[delta.request_id] = pieces.get(delta.request_id, "") + delta.text
            if delta.finish_reason is not None:
                ends[delta.request_id] = delta.finish_reason.value
    assert len(ends) == len(generations), f"unfinished after {timeout_s} s: {ends}"
    return {rid: (pieces.get(rid, ""), end) for rid, end in ends.items()}


def test_guided_text_follows_the_schema_and_a_continuation_resumes_the_grammar(engine):
    schema = json.dumps(PERSON)
    guided = [Generation(f"g{seed}", PROMPT, 40, Sampling(temperature=1.0, seed=seed),
                         guide=engine.compile_guide("json_schema", schema))
              for seed in (1, 2)]
    free = Generation("free", PROMPT, 8, Sampling())  # beside them, unconstrained
    results = texts(engine, [*guided, free])
    for generation in guided:
        text, finish_reason = results[generation.request_id]
        assert finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert results["free"][0]

    start = '{"name":"Al'
    [(text, finish_reason)] = texts(engine, [Generation(
        "continued", PROMPT, 30, Sampling(),
        guide=engine.compile_guide("json_schema", schema),
        continued=tuple(engine._encode(start)))]).values()
    assert finish_reason == "stop"
    jsonschema.validate(json.loads(start + text), PERSON)


def test_what_the_grammar_refuses_is_a_refusal(engine):
    with pytest.raises(ValueError, match="guided_decoding_guide cannot be compiled"):
        engine.compile_guide("json_schema", '{"type": "strin"}')
    with pytest.raises(ValueError, match="continue_ids do not follow"):
        engine.submit(Generation("bad", PROMPT, 4, Sampling(),
                                 guide=engine.compile_guide("json_schema", json.dumps(PERSON)),
                                 continued=tuple(engine._encode("[1"))))
