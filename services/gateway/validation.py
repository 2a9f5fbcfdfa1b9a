"""Validation of every public field, against the tenant's plan and the model version.

A bad request is refused here with `InvalidArgument` naming the field and the limit, before it
costs quota or reaches a backend. The result is the exact `EngineRequest` that will be sent.
Sizes that do not depend on the plan or the model (strings, lists) were checked when the request
was built (`requests.FIELD_LIMITS`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from backends.triton.adapter import EngineRequest
from services.common.errors import InvalidArgument
from services.gateway.requests import FIELD_LIMITS, REQUEST_ID, GenerationRequest, Principal
from services.gateway.tokenizers import PromptTokenizer
from services.registry.manifest import ModelVersion

ROLES = ("system", "user", "assistant")
PRIORITIES = range(0, 4)
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """Gateway-wide limits that hold whatever the plan or model allows."""

    max_prompt_chars: int = FIELD_LIMITS["prompt"].chars  # as rendered by the chat template
    default_timeout_s: float = 120.0
    max_timeout_s: float = 600.0


@dataclass(frozen=True)
class ValidatedGeneration:
    engine: EngineRequest
    prompt_tokens: int  # exact: counted with the version's own tokenizer
    timeout_s: float


def new_request_id() -> str:
    return uuid.uuid4().hex


def validate_request_id(request_id: str) -> str:
    if not request_id:
        return new_request_id()
    if not REQUEST_ID.match(request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return request_id


def validate(
    request: GenerationRequest, principal: Principal, version: ModelVersion, limits: Limits,
    tokenizer: PromptTokenizer,
) -> ValidatedGeneration:
    """`tokenizer` is the version's own (`TokenizerStore.get`): it renders `messages` with the
    model's chat template and counts the prompt's tokens exactly, as the engine will."""
    prompt, prompt_field = _prompt(request, limits, tokenizer)
    plan = principal.plan
    sampling = request.sampling
    max_output = min(version.max_output_tokens, plan.max_output_tokens)
    max_tokens = sampling.max_tokens
    if max_tokens is None:
        max_tokens = min(version.sampling["max_tokens"], max_output)
    elif not 1 <= max_tokens <= max_output:
        raise InvalidArgument("params.max_tokens", f"must be 1..{max_output}, got {max_tokens}")
    context_limit = min(version.context_window, plan.max_context_tokens)
    prompt_tokens = tokenizer.count(prompt)
    if prompt_tokens + max_tokens > context_limit:
        raise InvalidArgument(
            prompt_field,
            f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the context window "
            f"of {context_limit} tokens",
        )
    _check_range("params.temperature", sampling.temperature, 0.0, 2.0)
    if sampling.top_p is not None and not 0.0 < sampling.top_p <= 1.0:
        raise InvalidArgument("params.top_p", f"must be in (0, 1], got {sampling.top_p}")
    _check_range("params.top_k", sampling.top_k, 0, 1000)
    _check_range("params.seed", sampling.seed, 0, UINT64_MAX)
    if sampling.repetition_penalty is not None and not 0.0 < sampling.repetition_penalty <= 2.0:
        raise InvalidArgument(
            "params.repetition_penalty", f"must be in (0, 2], got {sampling.repetition_penalty}"
        )
    _check_range("params.presence_penalty", sampling.presence_penalty, -2.0, 2.0)
    _check_range("params.frequency_penalty", sampling.frequency_penalty, -2.0, 2.0)
    _check_range("params.min_tokens", sampling.min_tokens, 0, max_tokens)
    if request.priority not in PRIORITIES:
        raise InvalidArgument("priority", f"unknown priority {request.priority}")
    timeout_s = limits.default_timeout_s if request.timeout_s is None else request.timeout_s
    if not 0.0 < timeout_s <= limits.max_timeout_s:
        raise InvalidArgument("timeout", f"must be in (0, {limits.max_timeout_s:g}] seconds")
    defaults = version.sampling
    engine = EngineRequest(
        triton_model_name=version.triton_model_name,
        request_id=request.request_id,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=defaults["temperature"] if sampling.temperature is None else sampling.temperature,
        top_p=defaults["top_p"] if sampling.top_p is None else sampling.top_p,
        top_k=sampling.top_k if sampling.top_k is not None else (defaults.get("top_k") or None),
        seed=sampling.seed,
        min_tokens=sampling.min_tokens,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        stop=sampling.stop,
        bad_words=sampling.bad_words,
    )
    return ValidatedGeneration(engine, prompt_tokens, timeout_s)


def _prompt(
    request: GenerationRequest, limits: Limits, tokenizer: PromptTokenizer
) -> tuple[str, str]:
    """The prompt the engine gets, and the request field it came from."""
    if request.prompt is not None and request.messages is not None:
        raise InvalidArgument("input", "set either prompt or messages, not both")
    if request.messages is not None:
        for index, turn in enumerate(request.messages):
            if turn.role not in ROLES:
                raise InvalidArgument(f"messages[{index}].role", f"must be one of {ROLES}")
            if not turn.content.strip():
                raise InvalidArgument(f"messages[{index}].content", "must not be empty")
        prompt = tokenizer.render(request.messages)
        field = "messages"
    else:
        prompt = request.prompt or ""
        field = "prompt"
        if not prompt.strip():
            raise InvalidArgument("prompt", "is required (or messages)")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"must be at most {limits.max_prompt_chars} characters")
    return prompt, field


def _check_range(field: str, value: float | int | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidArgument(field, f"must be in [{low:g}, {high:g}], got {value}")

