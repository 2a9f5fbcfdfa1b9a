"""A generated token's log probability as the engines report it and both fronts show it: shared
by the Triton adapter (which reads it off the engine's outputs) and the gateway (gRPC frames,
OpenAI's shapes), so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenLogprob", "TopLogprob"]


@dataclass(frozen=True)
class TopLogprob:
    token: str  # as the engine's tokenizer spells it (a partial character as U+FFFD)
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model's raw distribution (before
    temperature, penalties and logit_bias), and the most likely tokens' at its step, most likely
    first."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()
