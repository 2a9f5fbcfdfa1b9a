"""Validation of every public field, against the tenant's plan and the model version.

A bad request is refused here with `InvalidArgument` naming the field and the limit, before it
costs quota or reaches a backend: first every check that needs no tokenizer
(`check_parameters`, which includes what the version's engine can do), then rendering and
counting (`prepare_prompt`), then the context window (`finish_validation`). The result is the
exact `EngineRequest` that will be sent.
Sizes that do not depend on the plan or the model (strings, lists) were checked when the request
was built (`requests.FIELD_LIMITS`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from backends.triton.adapter import EngineRequest
from services.common.errors import InvalidArgument
from services.common.kv_blocks import DEFAULT_BLOCK_TOKENS, prompt_blocks
from services.common.structured_output import grammar_of
from services.gateway.requests import (
    FIELD_LIMITS,
    MAX_TOP_LOGPROBS,
    REQUEST_ID,
    ChatTurn,
    GenerationRequest,
    Principal,
    ResponseFormat,
)
from services.gateway.tokenizers import PromptTokenizer
from services.gateway.tool_calls import forced_schema, tools_block
from services.registry.engine_capabilities import (
    EngineCapabilities,
    capabilities_of,
    first_unsupported,
)
from services.registry.manifest import ModelVersion

ROLES = ("system", "user", "assistant", "tool")
PRIORITIES = range(4)
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
    kv_block_hashes: tuple[int, ...] = ()  # the prompt's token blocks, as the engine hashes them
    kv_block_tokens: int = 0


def new_request_id() -> str:
    return uuid.uuid4().hex


def validate_request_id(request_id: str) -> str:
    if not request_id:
        return new_request_id()
    if not REQUEST_ID.match(request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return request_id


# Below this many characters of input, rendering and counting run inline: measured on the
# SmolLM2 tokenizer, a 100-character chat costs ~180 us inline and ~200 us through a thread,
# a 4 000-character one 2.8 ms of event-loop time inline (docs/decisions.md).
OFFLOAD_MIN_CHARS = 1024


def input_chars(request: GenerationRequest) -> int:
    """What `prepare_prompt` works through: the prompt or messages, and a structured output's
    schema (compiled there)."""
    schema = len(request.response_format.json_schema) + sum(
        len(tool.parameters) + len(tool.description) for tool in request.tools)
    if request.messages is not None:
        return schema + sum(len(turn.content) for turn in request.messages)
    return schema + len(request.prompt or "")


@dataclass(frozen=True)
class CheckedParameters:
    """What `check_parameters` settled without the tokenizer (the cheap part)."""

    max_tokens: int
    context_limit: int
    timeout_s: float
    cache_salt: str = ""  # the engine's prefix-cache partition (Principal.prefix_salt)
    guide: tuple[str, str] = ("", "")  # the engine's guided decoding (type, guide); "" for none
    continuation: bool = False  # the engine reports token ids: a cut stream can go on elsewhere


def check_parameters(
    request: GenerationRequest, principal: Principal, version: ModelVersion, limits: Limits,
) -> CheckedParameters:
    """Every check that needs no tokenizer: sampling ranges, what the version's engine can do,
    priority, deadline and the chat's roles. Runs before rendering and tokenizing, so a request
    that is wrong anyway never costs them."""
    plan = principal.plan
    sampling = request.sampling
    max_output = min(version.max_output_tokens, plan.max_output_tokens)
    max_tokens = sampling.max_tokens
    if max_tokens is None:
        max_tokens = min(version.sampling["max_tokens"], max_output)
    elif not 1 <= max_tokens <= max_output:
        raise InvalidArgument("params.max_tokens", f"must be 1..{max_output}, got {max_tokens}")
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
    _check_range("params.top_logprobs", sampling.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if sampling.top_logprobs is not None and not sampling.logprobs:
        raise InvalidArgument("params.top_logprobs", "needs logprobs to be true")
    unsupported = first_unsupported(version.engine_kind, {
        "repetition_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "bad_words": sampling.bad_words,
        "logit_bias": sampling.logit_bias,
    })
    if unsupported is not None:
        raise InvalidArgument(
            f"params.{unsupported}",
            f"{version.name}@{version.version_id[:19]} runs on the {version.engine_kind!r} "
            f"engine, which does not support it (leave it unset)")
    if request.priority not in PRIORITIES:
        raise InvalidArgument("priority", f"unknown priority {request.priority}")
    timeout_s = limits.default_timeout_s if request.timeout_s is None else request.timeout_s
    if not 0.0 < timeout_s <= limits.max_timeout_s:
        raise InvalidArgument("timeout", f"must be in (0, {limits.max_timeout_s:g}] seconds")
    if request.prompt is not None and request.messages is not None:
        raise InvalidArgument("input", "set either prompt or messages, not both")
    if request.messages is not None:
        for index, turn in enumerate(request.messages):
            if turn.role not in ROLES:
                raise InvalidArgument(f"messages[{index}].role", f"must be one of {ROLES}")
            if not turn.content.strip():
                raise InvalidArgument(f"messages[{index}].content", "must not be empty")
    elif not (request.prompt or "").strip():
        raise InvalidArgument("prompt", "is required (or messages)")
    context_limit = min(version.context_window, plan.max_context_tokens)
    capabilities = capabilities_of(version.engine_kind)
    cache_salt = principal.prefix_salt if capabilities.prefix_cache else ""
    check_tools(request)
    guide = check_response_format(requested_format(request), version, capabilities)
    return CheckedParameters(max_tokens, context_limit, timeout_s, cache_salt, guide,
                             capabilities.continuation)


def forced_tool_call(request: GenerationRequest) -> bool:
    """Whether the answer must be a call (`required` or a named function)."""
    return bool(request.tools) and request.tool_choice in ("required", "function")


def check_tools(request: GenerationRequest) -> None:
    """Tools need a chat; a named choice names one of them; each function's parameters are a
    JSON object (a schema); a forced call is a structured output of its own."""
    if not request.tools:
        if request.tool_choice in ("required", "function"):
            raise InvalidArgument("tool_choice", "needs tools")
        return
    if request.messages is None:
        raise InvalidArgument("tools", "need messages (a chat), not a prompt")
    for index, tool in enumerate(request.tools):
        try:
            parameters = json.loads(tool.parameters)
        except (ValueError, RecursionError):
            parameters = None
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"tools[{index}].function.parameters",
                                  "must be a JSON object (a JSON schema)")
    names = {tool.name for tool in request.tools}
    if request.tool_choice == "function" and request.tool_choice_name not in names:
        raise InvalidArgument("tool_choice", "must name one of the tools")
    if forced_tool_call(request) and request.response_format.type != "text":
        raise InvalidArgument("response_format", "cannot be combined with a forced tool_choice")


def requested_format(request: GenerationRequest) -> ResponseFormat:
    """What the engine must follow: a forced call's schema (`tool_calls.forced_schema`), else
    the client's `response_format`."""
    if forced_tool_call(request):
        name = request.tool_choice_name if request.tool_choice == "function" else ""
        return ResponseFormat("json_schema", forced_schema(request.tools, name,
                                                           request.parallel_tool_calls))
    return request.response_format


def with_tools(messages: tuple[ChatTurn, ...], request: GenerationRequest
               ) -> tuple[ChatTurn, ...]:
    """The chat with the tools' system block (`tool_calls.tools_block`) merged into its system
    message, or first; unchanged without tools or with tool_choice `none`."""
    if not request.tools or request.tool_choice == "none":
        return messages
    block = tools_block(request.tools)
    if messages and messages[0].role == "system":
        return (ChatTurn("system", f"{messages[0].content}\n\n{block}"), *messages[1:])
    return (ChatTurn("system", block), *messages)


def check_response_format(response_format: ResponseFormat, version: ModelVersion,
                          capabilities: EngineCapabilities) -> tuple[str, str]:
    """The guided-decoding inputs for the engine, or InvalidArgument naming `response_format`
    when the version's engine cannot follow one. Whether the schema compiles is checked with
    the expensive part (`prepare_prompt`)."""
    guide = _guide_of(response_format)
    if guide[0] and not capabilities.guided_decoding:
        raise InvalidArgument(
            "response_format",
            f"{version.name}@{version.version_id[:19]} runs on the {version.engine_kind!r} "
            f"engine, which does not support structured output")
    return guide


def _guide_of(response_format: ResponseFormat) -> tuple[str, str]:
    """OpenAI's `response_format` as TensorRT-LLM's (guide type, guide); ("", "") for text."""
    if response_format.type == "json_object":
        return "json", ""
    if response_format.type == "json_schema":
        return "json_schema", response_format.json_schema
    return "", ""


def _check_guide_compiles(response_format: ResponseFormat, field: str) -> None:
    """The engines' own rule (`grammar_of`): ~3 ms per KiB of schema the first time, a lookup
    for a schema seen lately. `field`: where the schema came from (a forced tool call's is the
    tools')."""
    guide = _guide_of(response_format)
    if not guide[0]:
        return
    try:
        grammar_of(*guide)
    except ValueError as error:
        raise InvalidArgument(field, str(error).removeprefix("guided_decoding_guide ")) from None


@dataclass(frozen=True)
class PreparedPrompt:
    text: str  # what the engine gets: the prompt, or the chat rendered by its template
    field: str  # the request field it came from (prompt | messages)
    tokens: int  # counted with the version's own tokenizer
    kv_block_hashes: tuple[int, ...] = ()  # services/common/kv_blocks.py, when asked for
    kv_block_tokens: int = 0


def kv_block_tokens(version: ModelVersion) -> int:
    """Tokens per KV block of the version's engine: its manifest's page size, or the default."""
    return int(version.engine.get("page_size") or DEFAULT_BLOCK_TOKENS)


def prepare_prompt(
    request: GenerationRequest, limits: Limits, tokenizer: PromptTokenizer,
    block_tokens: int = 0, cache_salt: str = "",
) -> PreparedPrompt:
    """Renders and counts: the expensive part (a chat template, a tokenizer pass over up to
    200 000 characters), run after `check_parameters` and, for long inputs, off the event loop
    (`GenerationPipeline`). Plain CPU work, safe in any thread. With `block_tokens`, also the
    prompt's KV block hashes (salted as the engine's cache is), for precise routing. A
    structured output's schema is compiled here too, once (the engines' rule; the answer is
    cached)."""
    _check_guide_compiles(requested_format(request),
                          "tools" if forced_tool_call(request) else "response_format")
    if request.messages is not None:
        prompt, field = tokenizer.render(with_tools(request.messages, request)), "messages"
    else:
        prompt, field = request.prompt or "", "prompt"
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"must be at most {limits.max_prompt_chars} characters")
    vocab = tokenizer.vocab_size
    outside = [t for t, _ in request.sampling.logit_bias if t >= vocab]
    if outside:
        raise InvalidArgument("params.logit_bias",
                              f"token id {outside[0]} is not in the vocabulary (0..{vocab - 1})")
    if not block_tokens:
        return PreparedPrompt(prompt, field, tokenizer.count(prompt))
    token_ids = tokenizer.token_ids(prompt)
    return PreparedPrompt(prompt, field, len(token_ids),
                          tuple(prompt_blocks(token_ids, block_tokens, cache_salt)), block_tokens)


def finish_validation(
    request: GenerationRequest, version: ModelVersion, checked: CheckedParameters,
    prompt: PreparedPrompt,
) -> ValidatedGeneration:
    """The context-window check, then the exact `EngineRequest`."""
    if prompt.tokens + checked.max_tokens > checked.context_limit:
        raise InvalidArgument(
            prompt.field,
            f"{prompt.tokens} prompt tokens + max_tokens {checked.max_tokens} exceed the "
            f"context window of {checked.context_limit} tokens",
        )
    sampling = request.sampling
    defaults = version.sampling
    engine = EngineRequest(
        triton_model_name=version.triton_model_name,
        request_id=request.request_id,
        prompt=prompt.text,
        max_tokens=checked.max_tokens,
        temperature=(defaults["temperature"] if sampling.temperature is None
                     else sampling.temperature),
        top_p=defaults["top_p"] if sampling.top_p is None else sampling.top_p,
        top_k=sampling.top_k if sampling.top_k is not None else (defaults.get("top_k") or None),
        seed=sampling.seed,
        min_tokens=sampling.min_tokens,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        stop=sampling.stop,
        bad_words=sampling.bad_words,
        cache_salt=checked.cache_salt,
        logit_bias=sampling.logit_bias,
        top_logprobs=(sampling.top_logprobs or 0) if sampling.logprobs else None,
        guided_decoding_guide_type=checked.guide[0],
        guided_decoding_guide=checked.guide[1],
        return_output_ids=checked.continuation,
    )
    return ValidatedGeneration(engine, prompt.tokens, checked.timeout_s, prompt.kv_block_hashes,
                               prompt.kv_block_tokens)


def validate(
    request: GenerationRequest, principal: Principal, version: ModelVersion, limits: Limits,
    tokenizer: PromptTokenizer,
) -> ValidatedGeneration:
    """All three steps inline. `tokenizer` is the version's own (`TokenizerStore.get`): it
    renders `messages` with the model's chat template and counts the prompt's tokens exactly,
    as the engine will."""
    checked = check_parameters(request, principal, version, limits)
    return finish_validation(request, version, checked,
                             prepare_prompt(request, limits, tokenizer))


def _check_range(field: str, value: float | int | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidArgument(field, f"must be in [{low:g}, {high:g}], got {value}")

