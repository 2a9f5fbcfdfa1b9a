"""The reference engine's text and step physics, without Triton."""

from __future__ import annotations

import dataclasses
import math

import pytest

from backends.triton.reference_engine import (
    CORPUS,
    MAX_NATURAL_TOKENS,
    MIN_NATURAL_TOKENS,
    EngineConfig,
    EngineStats,
    FinishReason,
    GenerationRequest,
    KvBlockPool,
    ReferenceEngine,
    StepTiming,
    complete,
    count_tokens,
    made_up_logprobs,
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
    cache_salt: str = "",
) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, max_tokens, seed, min_tokens, stop, cache_salt)


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
    assert engine.stats == EngineStats(active=2, max=2, waiting=1, scheduled=2, context=2,
                                       kv_max=4096, kv_used=2, kv_free=4094, kv_reused=0,
                                       kv_tokens_per=64)
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
    with pytest.raises(ValueError, match="max_active_requests must be at least 1"):
        EngineConfig(max_active_requests=0)
    with pytest.raises(ValueError, match="kv_cache_blocks must be at least 1, got 0"):
        EngineConfig(kv_cache_blocks=0)
    with pytest.raises(ValueError, match="kv_block_tokens must be at least 1"):
        EngineConfig(kv_block_tokens=-2)
    with pytest.raises(ValueError):
        StepTiming(decode_step_ms=-1)
    engine = ReferenceEngine()
    engine.add_request(request(0))
    with pytest.raises(ValueError):
        engine.add_request(request(0))


# --- the paged KV cache and the prefix cache ---

def words(count: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


def held_blocks(engine: ReferenceEngine, tokens_by_request: dict[int, int]) -> int:
    return sum(math.ceil(t / engine.config.kv_block_tokens) for t in tokens_by_request.values())


def test_a_running_request_holds_ceil_tokens_over_block_size_blocks_and_grows() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=64, kv_block_tokens=4))
    prompts = {0: words(6), 1: words(3, 100), 2: words(9, 200)}
    for request_id, prompt in prompts.items():
        engine.add_request(request(request_id, prompt=prompt, seed=request_id, max_tokens=20))
    tokens = {request_id: count_tokens(prompt) for request_id, prompt in prompts.items()}
    used = []
    while engine.has_unfinished_requests():
        for output in engine.step().outputs:
            tokens[output.request_id] += 1
            if output.finish_reason is not None:
                del tokens[output.request_id]
        assert engine.stats.kv_used == held_blocks(engine, tokens)
        assert engine.stats.kv_used + engine.stats.kv_free == 64
        used.append(engine.stats.kv_used)
    # 25, 22 and 28 tokens before the last step, which ends all three (max_tokens=20).
    assert used[0] == 2 + 1 + 3 and max(used) == 7 + 6 + 7
    assert engine.stats.kv_used == 0 and engine.stats.kv_free == 64


def test_finished_requests_free_their_blocks_and_keep_full_blocks_as_cache() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=16, kv_block_tokens=4))
    engine.add_request(request(0, prompt=words(10), max_tokens=3))
    run_to_completion(engine)
    stats = engine.stats
    # 13 tokens: three full blocks stay cached (refcount 0, reusable), the partial one is empty.
    assert (stats.kv_used, stats.kv_free, stats.kv_reused, stats.kv_fraction) == (0, 16, 3, 0.0)


def test_cancelling_frees_the_blocks_at_once_running_or_waiting() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=4, kv_block_tokens=4))
    engine.add_request(request(0, prompt=words(11)))  # 12 tokens after a step: 3 blocks
    engine.add_request(request(1, prompt=words(5, 50)))  # needs 2: waits
    engine.step()
    assert (engine.stats.kv_used, engine.stats.active, engine.stats.waiting) == (3, 1, 1)
    assert engine.abort_request(0)
    assert engine.stats.kv_used == 0
    engine.step()
    assert (engine.stats.kv_used, engine.stats.active) == (2, 1)
    assert engine.abort_request(1)
    assert (engine.stats.kv_used, engine.stats.kv_free) == (0, 4)


def test_requests_that_do_not_fit_wait_fcfs_and_the_pool_is_never_exceeded() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=5, kv_block_tokens=4))
    for request_id in range(4):  # 7 prompt tokens each: 2 blocks at admission
        engine.add_request(request(request_id, prompt=words(7, 10 * request_id), max_tokens=6))
    first = engine.step()
    assert {o.request_id for o in first.outputs} == {0, 1}  # 2 x 2 blocks; 1 left is too few
    assert (engine.stats.active, engine.stats.waiting, engine.stats.kv_used) == (2, 2, 4)
    admitted_order = [0, 1]
    while engine.has_unfinished_requests():
        result = engine.step()
        assert engine.stats.kv_used <= 5
        for output in result.outputs:
            if output.first_token:
                admitted_order.append(output.request_id)
    assert admitted_order == [0, 1, 2, 3]


def test_a_request_that_cannot_grow_preempts_the_newest_which_resumes_its_text_unchanged() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=5, kv_block_tokens=4))
    # Each fits the 20 tokens of the pool alone (18 tokens at the end), not both together.
    engine.add_request(request(0, prompt=words(3), seed=1, max_tokens=15))
    engine.add_request(request(1, prompt=words(3, 50), seed=2, max_tokens=15))
    deltas: dict[int, list[str]] = {0: [], 1: []}
    preempted_seen = False
    while engine.has_unfinished_requests():
        result = engine.step()
        stats = engine.stats
        assert stats.kv_used <= 5
        if stats.active == 1 and stats.waiting == 1:
            preempted_seen = True
            assert [o.request_id for o in result.outputs] == [0]  # the oldest keeps running
        for output in result.outputs:
            deltas[output.request_id].append(output.delta)
    assert preempted_seen
    for request_id, seed in ((0, 1), (1, 2)):
        prompt = words(3, 50 * request_id)
        assert "".join(deltas[request_id]) == complete(
            request(prompt=prompt, seed=seed, max_tokens=15)).text


def test_a_preempted_request_is_prefilled_again_from_what_stayed_cached() -> None:
    timing = StepTiming(prefill_us_per_token=1000, decode_step_ms=0, decode_step_ms_per_request=0)
    engine = ReferenceEngine(EngineConfig(timing=timing, kv_cache_blocks=6, kv_block_tokens=4))
    engine.add_request(request(0, prompt=words(7), max_tokens=12))  # 19 tokens: 5 blocks
    engine.add_request(request(1, prompt=words(7, 50), max_tokens=12))
    tokens = {0: 7, 1: 7}
    readmissions = []
    while engine.has_unfinished_requests():
        was_waiting = engine.stats.waiting == 1 and tokens[1] > 7
        result = engine.step()
        if was_waiting and engine.stats.waiting == 0:
            readmissions.append((result.duration_s * 1000, tokens[1]))
        for output in result.outputs:
            tokens[output.request_id] += 1
    # Its last block was partial (never cached, so reused first); its full blocks were kept.
    assert readmissions and all(round(prefilled) < held for prefilled, held in readmissions)


def test_a_prompt_that_can_never_fit_is_refused_and_max_tokens_is_clipped_to_the_pool() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=2, kv_block_tokens=4))
    with pytest.raises(ValueError, match=r"needs 3 KV blocks .* kv_cache_blocks=2"):
        engine.add_request(request(0, prompt=words(8)))
    engine.add_request(request(1, prompt=words(2)))
    deltas = run_to_completion(engine)[1]
    natural = complete(request(prompt=words(2))).text
    assert len(deltas) == 6  # max_tokens clipped: 2 + 6 tokens fill both blocks
    assert natural.startswith("".join(deltas))
    assert engine.stats.kv_used == 0


def test_a_prefix_hit_skips_its_prefill_and_is_reported() -> None:
    timing = StepTiming(prefill_us_per_token=1000, decode_step_ms=1, decode_step_ms_per_request=0)
    engine = ReferenceEngine(EngineConfig(timing=timing, kv_cache_blocks=32, kv_block_tokens=4))
    system = words(10)  # two full blocks and two words
    engine.add_request(request(0, prompt=f"{system} first question", max_tokens=2))
    first = engine.step()
    assert first.duration_s == pytest.approx(0.001 + 12 * 0.001)
    assert first.outputs[0].kv_cache_reused_blocks == 0
    assert (first.prefilled_tokens, first.cached_tokens) == (12, 0)
    run_to_completion(engine)
    engine.add_request(request(1, prompt=f"{system} another question here", max_tokens=2))
    second = engine.step()
    # 13 prompt tokens, the first 8 cached (the third block differs after "w8 w9").
    assert second.duration_s == pytest.approx(0.001 + (13 - 8) * 0.001)
    assert second.outputs[0].kv_cache_reused_blocks == 2
    assert (second.prefilled_tokens, second.cached_tokens) == (13 - 8, 8)
    assert engine.stats.kv_used == 4  # 14 tokens, two of the blocks shared with the cache


def test_a_cache_salt_shares_prefix_blocks_only_within_its_salt() -> None:
    """Issue 15, class 9: an isolated tenant's identical prompt is prefilled again (its TTFT
    tells nothing of what another tenant sent); its own repeat is a hit."""
    timing = StepTiming(prefill_us_per_token=1000, decode_step_ms=1, decode_step_ms_per_request=0)
    engine = ReferenceEngine(EngineConfig(timing=timing, kv_cache_blocks=32, kv_block_tokens=4))
    prompt = words(9)  # two full blocks and one word

    def first_step(request_id: int, salt: str) -> tuple[float, int]:
        engine.add_request(request(request_id, prompt=prompt, max_tokens=2, cache_salt=salt))
        result = engine.step()
        run_to_completion(engine)
        return result.duration_s, result.cached_tokens

    assert first_step(0, "tenant-a") == (pytest.approx(0.001 + 9 * 0.001), 0)
    assert first_step(1, "tenant-b") == (pytest.approx(0.001 + 9 * 0.001), 0)
    assert first_step(2, "") == (pytest.approx(0.001 + 9 * 0.001), 0)
    assert first_step(3, "tenant-a") == (pytest.approx(0.001 + 1 * 0.001), 8)
    assert first_step(4, "") == (pytest.approx(0.001 + 1 * 0.001), 8)


def test_a_whole_cached_prompt_still_computes_its_last_token() -> None:
    timing = StepTiming(prefill_us_per_token=1000, decode_step_ms=0, decode_step_ms_per_request=0)
    engine = ReferenceEngine(EngineConfig(timing=timing, kv_cache_blocks=32, kv_block_tokens=4))
    for request_id in range(2):
        engine.add_request(request(request_id, prompt=words(8), max_tokens=1))
        result = engine.step()
    assert result.outputs[0].kv_cache_reused_blocks == 1
    assert result.duration_s == pytest.approx(4 * 0.001)


def test_running_requests_share_cached_blocks_and_a_later_turn_reuses_generated_blocks() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=32, kv_block_tokens=4))
    prompt = words(9)
    engine.add_request(request(0, prompt=prompt, seed=3, max_tokens=7))
    engine.step()
    engine.add_request(request(1, prompt=prompt + " again", seed=4, max_tokens=7))
    result = engine.step()
    assert [o.kv_cache_reused_blocks for o in result.outputs if o.request_id == 1] == [2]
    # Shared, not copied: 3 blocks for request 0 (11 tokens), 1 more for request 1's 3rd block.
    assert engine.stats.kv_used == 3 + 1
    run_to_completion(engine)
    reply = complete(request(prompt=prompt, seed=3, max_tokens=7)).text
    engine.add_request(request(2, prompt=f"{prompt}{reply} and then", max_tokens=1))
    # Turn two: the prompt's and the reply's full blocks (16 tokens: 4 blocks) are cached.
    assert engine.step().outputs[0].kv_cache_reused_blocks == 4


def test_the_pool_evicts_the_least_recently_released_block_and_a_request_tail_first() -> None:
    pool = KvBlockPool(num_blocks=4, block_tokens=4)
    a = [pool.allocate(), pool.allocate()]
    b = [pool.allocate()]
    for block, block_hash, parent in zip(a + b, (1, 2, 3), (None, 1, None), strict=True):
        pool.register(block, block_hash, parent)
    pool.release(a)
    pool.release(b)
    assert (pool.free, pool.cached_free) == (4, 3)
    assert pool.allocate() not in a + b  # the empty block goes first
    assert pool.allocate() == a[1]  # then a's tail: released before b, and tail before head
    assert pool.cached_prefix([1, 2, 3]) == [a[0]]
    assert pool.allocate() == a[0]
    assert pool.cached_prefix([1]) == [] and pool.cached_prefix([3]) == b
    pool.acquire(b[0])  # a hit takes the block out of the evictable set
    assert pool.free == 0
    with pytest.raises(RuntimeError):
        pool.allocate()


def test_lru_eviction_keeps_the_most_recently_used_prefix() -> None:
    engine = ReferenceEngine(EngineConfig(kv_cache_blocks=6, kv_block_tokens=4))
    for request_id, start in enumerate((0, 100)):  # prefixes A then B, 2 full blocks each
        engine.add_request(request(request_id, prompt=words(9, start), max_tokens=1))
        run_to_completion(engine)
    assert engine.stats.kv_reused == 4
    engine.add_request(request(2, prompt=words(5, 500), max_tokens=1))  # 2 blocks, 1 cached
    run_to_completion(engine)  # 2 empty blocks were enough: nothing evicted yet
    assert engine.stats.kv_reused == 5
    engine.add_request(request(3, prompt=words(11, 900), max_tokens=1))  # needs 3: evicts A's
    run_to_completion(engine)
    engine.add_request(request(4, prompt=words(9, 100), max_tokens=1))
    assert engine.step().outputs[0].kv_cache_reused_blocks == 2  # B survived
    engine.add_request(request(5, prompt=words(9, 0), max_tokens=1))
    assert engine.step().outputs[0].kv_cache_reused_blocks == 0  # A was evicted


def test_text_under_kv_pressure_is_the_text_without_it() -> None:
    tight = ReferenceEngine(EngineConfig(kv_cache_blocks=12, kv_block_tokens=4,
                                         max_active_requests=8))
    shared = words(10)
    for request_id in range(8):
        tight.add_request(request(request_id, prompt=f"{shared} q{request_id}", seed=request_id,
                                  max_tokens=30))
    deltas = run_to_completion(tight)
    for request_id in range(8):
        expected = complete(request(prompt=f"{shared} q{request_id}", seed=request_id,
                                    max_tokens=30))
        assert "".join(deltas[request_id]) == expected.text
    assert tight.stats.kv_used == 0


def test_made_up_log_probabilities_are_well_formed_and_the_chosen_word_is_the_most_likely():
    for word in (" The", " river", " harbour."):
        logprob, top = made_up_logprobs(word, 20)
        assert made_up_logprobs(word, 20) == (logprob, top)  # a function of the word
        assert top[0] == (word, logprob) and len(top) == 20
        assert len({t for t, _ in top}) == 20
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True) and max(values) == logprob < 0
        assert sum(math.exp(v) for v in values) < 1.0
    assert made_up_logprobs(" The", 0)[1] == ()


def _stream(engine: ReferenceEngine) -> list[tuple[str, int]]:
    """(delta, token id) of every step of the engine's one request."""
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend((o.delta, o.token_id) for o in engine.step().outputs)
    return outputs


@pytest.mark.parametrize(("seed", "stop", "max_tokens"), [
    (7, (), 10_000), (3, (), 40), (11, ("the ro", "xyz"), 10_000), (5, ("e t",), 60)])
def test_a_continuation_goes_on_exactly_where_the_client_stopped(seed, stop, max_tokens):
    """Cut after any token: the continuation, given the ids the client got (those whose text it
    got, or that were held back as a possible stop string) and the max_tokens left, sends the
    rest of the text: together, the original's, to the character; counts are the new tokens."""
    full = complete(request(seed=seed, stop=stop, max_tokens=max_tokens))
    engine = ReferenceEngine()
    engine.add_request(request(seed=seed, stop=stop, max_tokens=max_tokens))
    original = _stream(engine)
    for cut in range(1, len(original) - 1):
        sent = "".join(delta for delta, _ in original[:cut])
        continuation = request(seed=seed, stop=stop, max_tokens=max_tokens - cut)
        engine.add_request(dataclasses.replace(
            continuation, continued=tuple(token for _, token in original[:cut])))
        rest = []
        while engine.has_unfinished_requests():
            rest.extend(engine.step().outputs)
        assert sent + "".join(o.delta for o in rest) == full.text, cut
        assert rest[0].first_token and rest[-1].num_output_tokens == len(original) - cut
        assert rest[-1].finish_reason is full.finish_reason
        assert [o.token_id for o in rest] == [token for _, token in original[cut:]]


def test_a_continuation_of_another_requests_tokens_is_refused():
    engine = ReferenceEngine()
    engine.add_request(request())
    ids = tuple(token for _, token in _stream(engine))
    with pytest.raises(ValueError, match=r"continue_ids\[\d+\] does not continue"):
        engine.add_request(dataclasses.replace(request(seed=8), continued=ids[:3]))
    with pytest.raises(ValueError, match="not negative"):
        dataclasses.replace(request(), continued=(-1,))
