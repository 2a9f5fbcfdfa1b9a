"""What each engine kind (`manifest.engine.kind`) can do with a request's sampling parameters.

The gateway refuses a parameter the version's engine would not honour with INVALID_ARGUMENT
naming the field, before quota or routing, instead of forwarding it and relaying the engine's
refusal as an internal error. A parameter at its neutral value (the value that changes nothing)
is always accepted, as the engines themselves accept it.

    kind        honours                                               refuses when set
    torch       max_tokens temperature top_p top_k seed min_tokens    bad_words
                stop repetition_penalty presence_penalty
                frequency_penalty logit_bias
    reference   every parameter of the TensorRT-LLM interface (a simulator: it accepts them
                all, as TensorRT-LLM does, and its output depends on the seed only)

Both take structured output (`guided_decoding`: TensorRT-LLM's guided-decoding inputs); a kind
this table does not know gets neither.

Kept here, beside the manifest, so `meshctl registry push` and the gateway read one table; the
torch engine's own check (`model_repository/torch/1/model.py` `_NEUTRAL`) stays as the last line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CAPABILITIES", "NEUTRAL", "EngineCapabilities", "capabilities_of",
           "first_unsupported"]

# The value of each optional parameter that leaves the output unchanged.
NEUTRAL: Mapping[str, Any] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "bad_words": (),
    "logit_bias": (),
}
_EVERY = frozenset(NEUTRAL)


@dataclass(frozen=True)
class EngineCapabilities:
    kind: str
    optional: frozenset[str]  # which of `NEUTRAL`'s parameters it honours at other values
    # It keeps a prefix cache across requests and takes a `cache_salt` to partition it (both
    # do: the torch engine's is transformers' prefix sharing, its chains rooted at the salt).
    prefix_cache: bool = False
    # It constrains decoding to a JSON schema (`response_format`).
    guided_decoding: bool = False
    # It sends `output_ids` and takes `continue_ids`: a generation cut mid-stream can go on on
    # another replica (services/gateway/failover.py).
    continuation: bool = False
    # Its sampling is derived from (seed, position), so a seeded generation continued elsewhere
    # draws what it would have drawn; without it a moved sampled generation is not exact.
    position_sampling: bool = False
    # Without a seed it draws one of its own, so a continuation elsewhere would draw another: the
    # gateway draws the seed for a generation that may move. The reference engine's unseeded
    # draws are seed 0's (deterministic, so tests can compare exact output): nothing to draw.
    draws_own_seed: bool = True


CAPABILITIES: Mapping[str, EngineCapabilities] = {
    "torch": EngineCapabilities("torch", _EVERY - {"bad_words"}, prefix_cache=True,
                                guided_decoding=True, continuation=True,
                                position_sampling=True),
    "reference": EngineCapabilities("reference", _EVERY, prefix_cache=True,
                                    guided_decoding=True, continuation=True,
                                    position_sampling=True, draws_own_seed=False),
}


def capabilities_of(kind: str) -> EngineCapabilities:
    """An unknown kind (a manifest from a newer registry) gets the common denominator."""
    return CAPABILITIES.get(kind, EngineCapabilities(kind, frozenset()))


def first_unsupported(kind: str, values: Mapping[str, Any]) -> str | None:
    """The first parameter of `values` (name → value; None = not set) that the engine `kind`
    cannot honour at the value given, or None when it can do them all."""
    honoured = capabilities_of(kind).optional
    for name, neutral in NEUTRAL.items():
        value = values.get(name)
        if value is None or name in honoured:
            continue
        if (tuple(value) if isinstance(value, (list, tuple)) else value) != neutral:
            return name
    return None
