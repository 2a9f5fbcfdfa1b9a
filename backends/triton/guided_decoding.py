"""Guided decoding for the torch engine: a grammar compiled once per guide (llguidance), and for
each request a matcher that leaves only the tokens the grammar allows next.

The inputs are TensorRT-LLM's `guided_decoding_guide_type` and `guided_decoding_guide`
(`services.common.structured_output`). Compiling happens where the
request is parsed (`execute()`), never on the generation thread: a compiled guide is kept in a
bounded LRU by (type, guide), and each request takes a copy of its matcher (microseconds). On the
generation thread a matcher only fills its row's mask and consumes the token chosen for it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from services.common.structured_output import grammar_of

__all__ = ["Guide", "GuideCompiler"]


class Guide:
    """One request's matcher: the tokens it may take next, and the tokens it took."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def allowed(self, vocab: int) -> torch.Tensor:
        """A bool row over `vocab` logits: true where the grammar allows the token next (only
        EOS once the grammar is complete)."""
        words = np.full((vocab + 31) // 32, -1, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]
        return torch.from_numpy(bits.astype(bool))

    def consume(self, token_id: int) -> None:
        """The token chosen for this request (always one `allowed` gave)."""
        self._matcher.consume_token(token_id)

    @property
    def failed(self) -> str:
        """The matcher's error ("" when none): a token it did not allow was forced on it."""
        return self._matcher.get_error()


class GuideCompiler:
    """Compiles guides for one tokenizer and keeps the last `capacity` of them.

    Not thread-safe: one thread (the model's `execute()`) compiles; the guides it hands out are
    used on the generation thread."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 capacity: int = 64):
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on the first guide
        self._tokenizer_error = ""  # why llguidance could not read it, once it could not
        self._compiled: collections.OrderedDict[tuple[str, str], llguidance.LLMatcher] = (
            collections.OrderedDict())
        self._capacity = capacity

    def guide(self, guide_type: str, guide: str) -> Guide:
        """A fresh matcher for the guide; ValueError names what cannot be compiled."""
        key = (guide_type, guide)
        template = self._compiled.get(key)
        if template is None:
            grammar = grammar_of(guide_type, guide)
            template = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
            if template.is_error():
                raise ValueError(
                    f"guided_decoding_guide cannot be compiled: {template.get_error()[:300]}")
            self._compiled[key] = template
            if len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return Guide(template.deep_copy())

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the model's tokenizer (~0.3 s for SmolLM2's 49k tokens), made
        on the first guide: a model whose tokenizer llguidance cannot read still serves free
        text, and refuses structured output."""
        if self._tokenizer_error:  # tried once: not again on every guided request
            raise ValueError(self._tokenizer_error)
        if self._tokenizer is None:
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_token_ids)
            except Exception as error:  # whatever the library finds wrong with the tokenizer
                self._tokenizer_error = ("guided_decoding_guide cannot be used with this "
                                         f"model's tokenizer: {error}")
                raise ValueError(self._tokenizer_error) from None
        return self._tokenizer
