"""The torch engine's sampler on hand-made logits: what each row asks for, and only that."""

from __future__ import annotations

from types import SimpleNamespace

import llguidance
import pytest
import torch

from backends.triton.adapter import REQUEST_REFUSED, engine_failure
from backends.triton.guided_decoding import Guide
from backends.triton.torch_engine import _history, _Sampler
from services.common import errors
from services.common.structured_output import grammar_of

EOS = 3


def request(position: int = 0, initial_tokens: list[int] | None = None,
            generated_tokens: list[int] | None = None, **kwargs) -> SimpleNamespace:
    """What the sampler reads of a request in the batch (transformers' FutureRequestState)."""
    state = SimpleNamespace(logit_processor_kwargs=kwargs, generated_len=lambda: position,
                            initial_tokens=initial_tokens or [],
                            generated_tokens=generated_tokens or [], _true_initial_tokens=0,
                            request_id="r")
    return SimpleNamespace(state=state)


def _with_id(row: SimpleNamespace) -> SimpleNamespace:
    """The request id moves from the kwargs to the state, where transformers keeps it."""
    row.state.request_id = row.state.logit_processor_kwargs.pop("request_id")
    return row


def choose(sampler: _Sampler, requests: list[SimpleNamespace], logits: torch.Tensor) -> list[int]:
    sampler.prepare_tensor_args(requests)
    only = sampler(logits.clone(), torch.zeros(len(requests), dtype=torch.int32))
    assert (torch.isfinite(only).sum(dim=-1) == 1).all()  # one token left per row
    return only.argmax(dim=-1).tolist()


def test_greedy_takes_the_argmax_and_never_eos_below_min_tokens():
    sampler = _Sampler([EOS])
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 3.0]])
    assert choose(sampler, [request(temperature=0.0)], logits) == [EOS]
    assert choose(sampler, [request(2, temperature=0.0, min_tokens=3)], logits) == [4]
    assert choose(sampler, [request(3, temperature=0.0, min_tokens=3)], logits) == [EOS]


def test_top_k_and_top_p_bound_what_a_sampled_row_can_draw():
    sampler = _Sampler([EOS])
    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0, 4.8, 0.5]])
    for seed in range(1, 200):
        row = {"temperature": 1.5, "choice_seed": seed}
        assert choose(sampler, [request(**row, top_k=1)], logits) == [1]
        assert choose(sampler, [request(**row, top_k=3)], logits)[0] in {1, 2, 4}
        assert choose(sampler, [request(**row, top_p=0.01)], logits) == [1]


def test_below_min_tokens_a_sampled_row_chooses_among_tokens_other_than_eos():
    """EOS is banned before top-k and top-p choose: a set that would hold only EOS holds the
    best other token instead (never token 0, which the logits give no chance)."""
    sampler = _Sampler([EOS])
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 3.0]])
    for seed in range(1, 50):
        row = {"temperature": 1.0, "choice_seed": seed, "min_tokens": 3}
        assert choose(sampler, [request(2, **row, top_k=1)], logits) == [4]
        assert choose(sampler, [request(2, **row, top_p=0.5)], logits) == [4]
        assert choose(sampler, [request(3, **row, top_k=1)], logits) == [EOS]


def test_a_seeded_row_draws_the_same_token_whatever_else_is_in_the_batch():
    sampler = _Sampler([EOS])
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    rows = [request(5, temperature=0.9, choice_seed=11), request(temperature=0.0),
            request(5, temperature=0.7, top_k=10, choice_seed=12), request(1, temperature=1.0,
                                                                          choice_seed=13)]
    batched = choose(sampler, rows, logits)
    alone = [choose(sampler, [row], logits[i:i + 1])[0] for i, row in enumerate(rows)]
    assert batched == alone


def test_sampled_rows_follow_the_softmax_at_their_temperature():
    sampler = _Sampler([EOS])
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0]])
    draws = 3000
    counts = torch.zeros(4)
    for seed in range(1, draws + 1):
        counts[choose(sampler, [request(temperature=2.0, choice_seed=seed)], logits)[0]] += 1
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    assert torch.allclose(counts / draws, expected, atol=0.03), (counts / draws, expected)


def test_logit_bias_and_penalties_change_the_greedy_choice_deterministically():
    """OpenAI's logit_bias, presence and frequency penalties (generated tokens only) and the
    repetition penalty (prompt and generated tokens), each per row, on hand-made logits."""
    sampler = _Sampler([EOS])
    logits = torch.tensor([[0.0, 4.0, 3.5, -9.0, 3.0, -1.0]])
    plain = request(2, temperature=0.0)
    assert choose(sampler, [plain], logits) == [1]
    assert choose(sampler, [request(temperature=0.0, logit_bias=((1, -100.0),))], logits) == [2]
    assert choose(sampler, [request(temperature=0.0, logit_bias=((5, 5.5),))], logits) == [5]
    # Token 1 generated once: a presence penalty of 1 brings it under token 2 (3.0 < 3.5).
    seen = {"initial_tokens": [4], "generated_tokens": [1]}
    assert choose(sampler, [request(1, temperature=0.0, presence_penalty=1.0, **seen)],
                  logits) == [2]
    # Token 1 twice: a frequency penalty of 0.3 costs it 0.6 (3.4 < 3.5); once, 0.3 (3.7).
    twice = {"initial_tokens": [4], "generated_tokens": [1, 1]}
    assert choose(sampler, [request(2, temperature=0.0, frequency_penalty=0.3, **twice)],
                  logits) == [2]
    assert choose(sampler, [request(1, temperature=0.0, frequency_penalty=0.3, **seen)],
                  logits) == [1]
    # The repetition penalty divides positive logits of prompt and generated tokens.
    assert choose(sampler, [request(1, temperature=0.0, repetition_penalty=1.2, **seen)],
                  logits) == [2]
    prompt_only = {"initial_tokens": [1, 2], "generated_tokens": []}
    assert choose(sampler, [request(temperature=0.0, repetition_penalty=1.5, **prompt_only)],
                  logits) == [4]
    # A negative penalty favours what was generated; another row in the batch is unaffected.
    both = choose(sampler, [request(1, temperature=0.0, presence_penalty=-2.0,
                                    generated_tokens=[4], initial_tokens=[]), plain],
                  torch.cat([logits, logits]))
    assert both == [4, 1]


def test_a_sampled_row_draws_from_its_penalized_distribution():
    sampler = _Sampler([EOS])
    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0, 4.8, 0.5]])
    for seed in range(1, 100):
        row = {"temperature": 1.0, "choice_seed": seed, "top_k": 2}
        assert choose(sampler, [request(**row, logit_bias=((1, -100.0), (2, -100.0)))],
                      logits)[0] in {4, 3}


def test_log_probabilities_are_the_raw_distributions_and_greedy_picks_the_most_likely():
    """Recorded per request from the logits before penalties and bias (vLLM's raw logprobs):
    a greedy row's chosen token is its top one; a biased row's chosen token keeps its own, lower
    log probability."""
    sampler = _Sampler([EOS])
    logits = torch.tensor([[0.0, 4.0, 3.5, -9.0, 3.0, -1.0]])
    expected = torch.log_softmax(logits[0], dim=-1)
    rows = [request(temperature=0.0, top_logprobs=3, request_id="a"),
            request(temperature=0.0, top_logprobs=0, logit_bias=((2, 10.0),), request_id="b"),
            request(temperature=0.0, request_id="c")]
    for request_id in "abc":
        sampler.track(request_id)
    sampler.prepare_tensor_args([_with_id(r) for r in rows])
    sampler(torch.cat([logits] * 3), torch.zeros(3, dtype=torch.int32))
    (greedy,) = sampler.take_logprobs("a", 5)
    assert greedy.token_id == 1 and greedy.logprob == pytest.approx(expected[1].item())
    assert [t for t, _ in greedy.top] == [1, 2, 4]
    assert greedy.top[0][1] == pytest.approx(greedy.logprob)
    (biased,) = sampler.take_logprobs("b", 5)
    assert biased.token_id == 2 and biased.logprob == pytest.approx(expected[2].item())
    assert biased.top == ()
    assert sampler.take_logprobs("c", 5) == ()  # it asked for none


def test_log_probabilities_are_taken_in_order_and_only_as_many_as_asked():
    sampler = _Sampler([EOS])
    sampler.track("a")
    row = _with_id(request(temperature=0.0, top_logprobs=0, request_id="a"))

    def step(roll: int) -> None:
        sampler.prepare_tensor_args([row])
        sampler(torch.tensor([[0.0, 1.0, 2.0, 0.0]]).roll(roll), torch.zeros(1, dtype=torch.int32))

    for roll in range(3):
        step(roll)
    assert [lp.token_id for lp in sampler.take_logprobs("a", 2)] == [2, 3]
    assert [lp.token_id for lp in sampler.take_logprobs("a", 2)] == [0]
    sampler.forget("a")
    assert sampler.take_logprobs("a", 1) == ()
    # Cancelled or cut by a stop string, a request may still be in the batch for one more
    # step: what that step chose is not kept for an id nothing will take it for.
    step(0)
    assert sampler._logprobs == {}


def test_a_continuation_draws_what_the_original_drew_at_the_same_absolute_position():
    """A continuation of 30 tokens at its own step 2 is the original at step 32: the same key,
    the same draw, and min_tokens counted from the original's start."""
    sampler = _Sampler([EOS])
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    for seed in range(1, 40):
        row = {"temperature": 0.8, "choice_seed": seed}
        original = choose(sampler, [request(32, **row)], logits)
        assert choose(sampler, [request(2, **row, position_offset=30)], logits) == original
    eos_first = torch.tensor([[0.0, 1.0, 2.0, 9.0, 3.0]])
    greedy = {"temperature": 0.0, "min_tokens": 3}
    assert choose(sampler, [request(1, **greedy, position_offset=1)], eos_first) == [4]
    assert choose(sampler, [request(1, **greedy, position_offset=2)], eos_first) == [EOS]


def test_a_continuations_moved_tokens_count_as_generated_for_the_penalties():
    state = SimpleNamespace(initial_tokens=[1, 2, 3, 4], generated_tokens=[5])
    assert _history(state, 2) == ([1, 2], [3, 4, 5])
    preempted = SimpleNamespace(initial_tokens=[1, 2, 3, 4, 5], _true_initial_tokens=4,
                                generated_tokens=[6])
    assert _history(preempted, 2) == ([1, 2], [3, 4, 5, 6])


def test_a_guided_row_whose_grammar_fails_ends_at_once_and_is_refused_naming_response_format():
    """A matcher that errs (an empty mask left the row only -inf) ends its row with EOS, and
    the engine takes why once; the engine's refusal is the client's response_format error."""
    tokenizer = llguidance.LLTokenizer("byte")
    matcher = llguidance.LLMatcher(tokenizer, grammar_of("json", ""))
    matcher.consume_token(ord("x"))  # what an all -inf row's argmax forces on it
    sampler = _Sampler([tokenizer.eos_token])
    sampler.track("r")
    sampler.guides[1] = Guide(matcher)
    logits = torch.zeros(1, tokenizer.vocab_size)
    assert choose(sampler, [request(temperature=0.0, guide=1)], logits) == [tokenizer.eos_token]
    failure = sampler.take_guide_failure("r")
    assert failure and sampler.take_guide_failure("r") == ""
    relayed = engine_failure("replica", f"{REQUEST_REFUSED}guided_decoding_guide {failure}")
    assert isinstance(relayed, errors.InvalidArgument) and relayed.field == "response_format"


def test_a_guided_row_that_keeps_to_its_grammar_reports_no_failure():
    tokenizer = llguidance.LLTokenizer("byte")
    sampler = _Sampler([tokenizer.eos_token])
    sampler.guides[1] = Guide(llguidance.LLMatcher(tokenizer, grammar_of("json", "")))
    logits = torch.zeros(1, tokenizer.vocab_size)
    logits[0, ord("x")] = 5.0  # the model prefers what the grammar refuses
    assert choose(sampler, [request(temperature=0.0, guide=1)], logits) == [ord("{")]
    assert sampler.take_guide_failure("r") == ""
