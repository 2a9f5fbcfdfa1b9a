"""The reference engine's text and step physics, without Triton."""

from __future__ import annotations

import pytest

from backends.triton.reference_engine import (
    CORPUS,
    MAX_NATURAL_TOKENS,
    MIN_NATURAL_TOKENS,
    EngineConfig,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ReferenceEngine,
    StepTiming,
    complete,
    count_tokens,
)

PROMPT = "Tell me about the harbour."


def request(
    request_id: int = 0,
    *,
    prompt: str = PROMPT,
    seed: int = 7,
    max_tokens: int = 10_000,
    min_tokens: int = 0,
    stop: tuple[str, ...] = (),
) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, max_tokens, seed, min_tokens, stop)


def run_to_completion(engine: ReferenceEngine) -> dict[int, list[str]]:
    deltas: dict[int, list[str]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step().outputs:
            deltas.setdefault(output.request_id, []).append(output.delta)
    return deltas


def test_count_tokens_is_a_whitespace_split() -> None:
    assert count_tokens("") == 0
    assert count_tokens("  one two\tthree\nfour ") == 4


def test_same_seed_and_prompt_give_the_same_text() -> None:
    assert complete(request()) == complete(request())


def test_different_seeds_or_prompts_give_different_texts() -> None:
    texts = {complete(request(seed=seed)).text for seed in range(20)}
    assert len(texts) >= 18
    assert complete(request(prompt="Something else.")).text != complete(request()).text


def test_tokens_are_words_with_their_leading_space() -> None:
    engine = ReferenceEngine()
    engine.add_request(request(max_tokens=30))
    for deltas in run_to_completion(engine).values():
        assert all(d.startswith(" ") and count_tokens(d) == 1 for d in deltas)


def test_text_ends_naturally_at_a_sentence_end_within_the_seeded_length() -> None:
    longest_sentence = max(count_tokens(s) for s in CORPUS)
    for seed in range(50):
        completion = complete(request(seed=seed))
        assert completion.finish_reason is FinishReason.STOP
        assert completion.text.endswith(".")
        assert completion.num_output_tokens == count_tokens(completion.text)
        assert completion.num_output_tokens >= MIN_NATURAL_TOKENS
        assert completion.num_output_tokens < MAX_NATURAL_TOKENS + longest_sentence
        sentences = completion.text.strip().split(". ")
        assert all(s.rstrip(".") + "." in CORPUS for s in sentences)


def test_max_tokens_stops_at_exactly_max_tokens_with_a_prefix_of_the_natural_text() -> None:
    natural = complete(request())
    for max_tokens in (1, 5, natural.num_output_tokens - 1):
        completion = complete(request(max_tokens=max_tokens))
        assert completion.finish_reason is FinishReason.LENGTH
        assert completion.num_output_tokens == count_tokens(completion.text) == max_tokens
        assert natural.text.startswith(completion.text)


def test_min_tokens_delays_the_natural_end() -> None:
    completion = complete(request(min_tokens=500))
    assert completion.finish_reason is FinishReason.STOP
    assert completion.num_output_tokens >= 500
    assert completion.text.endswith(".")


def test_stop_string_ends_the_text_before_it_and_is_not_emitted() -> None:
    natural = complete(request()).text
    stop = " ".join(natural.split()[3:5])  # two words: spans two tokens
    completion = complete(request(stop=(stop, "never appears")))
    assert completion.finish_reason is FinishReason.STOP
    assert completion.text == natural[: natural.index(stop)]
    assert stop not in completion.text
    assert completion.num_output_tokens == 5  # the stop string's tokens were generated


def test_stop_string_inside_a_word_truncates_mid_token() -> None:
    natural = complete(request()).text
    third_word = natural.split()[2]
    stop = third_word[1:]
    completion = complete(request(stop=(stop,)))
    assert completion.text == natural[: natural.index(stop)]


def test_text_that_may_start_a_stop_string_is_held_back_then_released() -> None:
    natural = complete(request()).text
    words = natural.split()
    stop = f" {words[1]} {words[2]} not-in-corpus"  # a real prefix that never completes
    engine = ReferenceEngine()
    engine.add_request(request(stop=(stop,)))
    deltas = run_to_completion(engine)[0]
    assert deltas[1:3] == ["", ""]  # words 2 and 3 wait: they could be the stop string
    assert deltas[3] == f" {words[1]} {words[2]} {words[3]}"
    assert "".join(deltas) == natural


def test_streamed_deltas_concatenate_to_the_complete_text() -> None:
    engine = ReferenceEngine()
    engine.add_request(request(seed=1))
    assert "".join(run_to_completion(engine)[0]) == complete(request(seed=1)).text


def test_one_step_advances_every_active_request_by_one_token() -> None:
    engine = ReferenceEngine()
    for request_id in range(3):
        engine.add_request(request(request_id, seed=request_id))
    outputs = engine.step().outputs
    assert sorted(o.request_id for o in outputs) == [0, 1, 2]
    assert all(o.num_output_tokens == 1 and o.first_token for o in outputs)
    assert all(o.num_output_tokens == 2 and not o.first_token for o in engine.step().outputs)


def test_requests_beyond_capacity_wait_and_join_when_a_slot_frees() -> None:
    engine = ReferenceEngine(EngineConfig(max_active_requests=2))
    engine.add_request(request(0, max_tokens=2))
    engine.add_request(request(1, max_tokens=5))
    engine.add_request(request(2, max_tokens=5))
    first = engine.step()
    assert {o.request_id for o in first.outputs} == {0, 1}
    assert engine.stats == EngineStats(active=2, max=2, waiting=1, scheduled=2, context=2)
    second = engine.step()  # request 0 finishes here, freeing its slot
    assert [o.finish_reason for o in second.outputs if o.request_id == 0] == [FinishReason.LENGTH]
    assert (engine.stats.active, engine.stats.waiting, engine.stats.context) == (1, 1, 0)
    third = engine.step()
    assert {o.request_id for o in third.outputs} == {1, 2}
    assert engine.stats.context == 1


def test_aborted_requests_leave_at_once_and_idle_stats_are_zero() -> None:
    engine = ReferenceEngine(EngineConfig(max_active_requests=1))
    engine.add_request(request(0))
    engine.add_request(request(1))
    engine.step()
    assert engine.abort_request(1)  # waiting
    assert engine.abort_request(0)  # active
    assert not engine.abort_request(0)
    assert not engine.has_unfinished_requests()
    assert engine.step().outputs == []
    stats = engine.stats
    assert (stats.active, stats.waiting, stats.scheduled, stats.context) == (0, 0, 0, 0)


def test_step_timing_model() -> None:
    timing = StepTiming(prefill_us_per_token=100, decode_step_ms=5, decode_step_ms_per_request=0.5)
    assert timing.prefill_seconds(1000) == pytest.approx(0.1)
    assert timing.decode_step_seconds(1) == pytest.approx(0.0055)
    assert timing.decode_step_seconds(8) == pytest.approx(0.009)


def test_a_step_costs_its_decode_plus_the_prefill_of_requests_admitted_in_it() -> None:
    timing = StepTiming(prefill_us_per_token=100, decode_step_ms=5, decode_step_ms_per_request=0.5)
    engine = ReferenceEngine(EngineConfig(timing=timing))
    prompt_tokens = count_tokens(PROMPT)
    engine.add_request(request(0))
    engine.add_request(request(1))
    first = engine.step()
    assert first.duration_s == pytest.approx(
        timing.decode_step_seconds(2) + 2 * timing.prefill_seconds(prompt_tokens)
    )
    assert engine.step().duration_s == pytest.approx(timing.decode_step_seconds(2))


def test_requests_the_engine_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        request(max_tokens=0)
    with pytest.raises(ValueError, match="stop strings"):
        request(stop=("",))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        EngineConfig(max_active_requests=0)
    with pytest.raises(ValueError):
        StepTiming(decode_step_ms=-1)
    engine = ReferenceEngine()
    engine.add_request(request(0))
    with pytest.raises(ValueError):
        engine.add_request(request(0))
