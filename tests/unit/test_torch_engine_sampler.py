"""The torch engine's sampler on hand-made logits: what each row asks for, and only that."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from backends.triton.torch_engine import _Sampler

EOS = 3


def request(position: int = 0, **kwargs) -> SimpleNamespace:
    """What the sampler reads of a request in the batch (transformers' FutureRequestState)."""
    state = SimpleNamespace(logit_processor_kwargs=kwargs, generated_len=lambda: position)
    return SimpleNamespace(state=state)


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
