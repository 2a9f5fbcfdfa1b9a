"""Log probabilities in OpenAI's two shapes (no HTTP here): a chat choice's `logprobs.content`
(one object per token, its bytes and its top tokens) and a legacy completion's parallel lists
(`tokens`, `token_logprobs`, `top_logprobs` as token → logprob maps, `text_offset`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.logprobs import TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs"]


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`ChatCompletionChoice.logprobs`: `content` per token; `refusal` is never produced."""
    return {"content": [{
        "token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token_bytes),
        "top_logprobs": [{"token": top.token, "logprob": top.logprob,
                          "bytes": list(top.token_bytes)} for top in lp.top],
    } for lp in logprobs], "refusal": None}


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """A completion choice's `logprobs`; `offset` is where this piece starts in the whole text
    (a stream's chunks continue the previous ones' offsets)."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{top.token: top.logprob for top in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
