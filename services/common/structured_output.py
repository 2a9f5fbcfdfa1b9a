"""Structured output's one rule for what a guide is, shared by the gateway (which refuses a guide
before it costs quota) and the engines (which compile it): TensorRT-LLM's guided-decoding inputs,
`guided_decoding_guide_type` (`json`: any JSON object; `json_schema`: the text of a JSON schema)
and `guided_decoding_guide`, turned into an llguidance grammar and checked by the library itself.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance

__all__ = ["GUIDE_TYPES", "MAX_SCHEMA_MINIMUM_COUNT", "grammar_of"]

GUIDE_TYPES = ("json", "json_schema")
# Compact JSON (no free whitespace): a small model left free to emit spaces and newlines between
# values can spend its whole budget on them.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}
_ANY_OBJECT = {"type": "object"}
# The keywords that force an instance's size: above this no context window holds the answer,
# and a simulator building it would run out of memory (llguidance itself compiles them lazily).
_MINIMUM_COUNTS = ("minLength", "minItems", "minProperties", "minContains")
MAX_SCHEMA_MINIMUM_COUNT = 100_000


@functools.lru_cache(maxsize=256)
def grammar_of(guide_type: str, guide: str) -> str:
    """The llguidance grammar for a guide; ValueError names the input that is wrong and why.

    The check needs no tokenizer (~0.5 ms for a small schema); the last 256 answers are kept,
    so a client that sends the same schema again costs a dictionary lookup."""
    if guide_type not in GUIDE_TYPES:
        raise ValueError(
            f"guided_decoding_guide_type must be one of {GUIDE_TYPES}, got {guide_type!r}")
    schema: Any = _ANY_OBJECT
    if guide_type == "json_schema":
        try:
            schema = json.loads(guide)
        except (ValueError, RecursionError):
            raise ValueError("guided_decoding_guide is not a JSON schema (not JSON)") from None
        if not isinstance(schema, dict):
            raise ValueError("guided_decoding_guide must be a JSON object (a JSON schema)")
        _check_minimum_counts(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except (ValueError, TypeError, RecursionError) as error:
        raise ValueError(f"guided_decoding_guide cannot be compiled: {error}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"guided_decoding_guide cannot be compiled: {problem[:300]}")
    return grammar


def _check_minimum_counts(schema: Any) -> None:
    """ValueError naming the first `minLength`/`minItems`/... above `MAX_SCHEMA_MINIMUM_COUNT`
    (iterative: a schema nested past the recursion limit is llguidance's to refuse)."""
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if (key in _MINIMUM_COUNTS and isinstance(value, int | float)
                        and not isinstance(value, bool) and value > MAX_SCHEMA_MINIMUM_COUNT):
                    raise ValueError(f"guided_decoding_guide {key} must be at most "
                                     f"{MAX_SCHEMA_MINIMUM_COUNT}, got {value}")
                pending.append(value)
