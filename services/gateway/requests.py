"""The gateway's own view of a generation request and of who sent it (no protobuf here).

Every client-supplied string and repeated field is bounded when a `GenerationRequest` is built
(`FIELD_LIMITS`), so no front can hand an unbounded value to what comes after it: the
idempotency cache, logs, metrics, audit events, shadow copies. What depends on the tenant's
plan or the model version (tokens, sampling ranges) is checked later, in `validation.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.common.auth import Principal
from services.common.errors import InvalidArgument
from services.gateway.tool_calls import TOOL_CHOICES, Tool

__all__ = ["FIELD_LIMITS", "MAX_LOGIT_BIAS", "MAX_TOP_LOGPROBS", "REQUEST_ID",
           "RESPONSE_FORMAT_TYPES", "ChatTurn", "ChoiceOf", "GenerationRequest", "Principal",
           "ResponseFormat", "SamplingRequest", "check_logit_bias"]

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class FieldLimit:
    """At most `chars` characters per value; for a repeated field also at most `entries`."""

    chars: int
    entries: int | None = None


# The documented limits (docs/decisions.md "Client-supplied fields are bounded at the edge").
# Field names are the gRPC ones; the HTTP front maps them to its own (`openai_param`).
FIELD_LIMITS: dict[str, FieldLimit] = {
    "request_id": FieldLimit(128),  # and only A-Z a-z 0-9 . _ : -
    "model": FieldLimit(256),  # a name, alias or pinned version: "name@sha256:<64 hex>"
    "idempotency_key": FieldLimit(128),
    "user": FieldLimit(256),
    "prompt": FieldLimit(200_000),
    "messages": FieldLimit(200_000, entries=256),  # chars: all contents together
    "messages.role": FieldLimit(32),
    "params.stop": FieldLimit(128, entries=4),
    "params.bad_words": FieldLimit(128, entries=16),
    "response_format.json_schema": FieldLimit(32_768),  # the schema's JSON text
    "response_format.name": FieldLimit(64),
    "tools": FieldLimit(65_536, entries=64),  # chars: all descriptions and parameters together
    "tools.name": FieldLimit(64),  # and only A-Z a-z 0-9 _ -
}
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 300  # entries of params.logit_bias (OpenAI's limit), each bias in [-100, 100]
LOGIT_BIAS_RANGE = (-100.0, 100.0)
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling parameters as the client sent them; None means "not set"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ascending by id
    logprobs: bool = False
    top_logprobs: int | None = None  # 0..MAX_TOP_LOGPROBS, with logprobs only
    n: int = 1  # choices (bounded by the gateway's max_choices: services/gateway/choices.py)


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output as the client asked for it (OpenAI's `response_format`)."""

    type: str = "text"  # one of RESPONSE_FORMAT_TYPES
    json_schema: str = ""  # the schema's JSON text, with type json_schema
    name: str = ""


@dataclass(frozen=True)
class ChoiceOf:
    """What makes a generation one of a request's n choices (services/gateway/choices.py)."""

    request_id: str  # the client's: the choices' audit records carry it, and the rollout keys by it
    index: int
    count: int


@dataclass(frozen=True)
class GenerationRequest:
    """Raises InvalidArgument (naming the field and its limit) when built with a field over
    `FIELD_LIMITS`: the check costs a few `len` calls and comes before anything keeps a value."""

    request_id: str
    model: str
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    idempotency_key: str = ""
    priority: int = 0
    user: str = ""
    timeout_s: float | None = None
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    tools: tuple[Tool, ...] = ()
    tool_choice: str = ""  # one of TOOL_CHOICES; "": auto with tools, none without
    tool_choice_name: str = ""  # the function, with tool_choice "function"
    parallel_tool_calls: bool = True
    choice: ChoiceOf | None = None  # set by the gateway on each of n > 1 choices, never by a client

    def __post_init__(self) -> None:
        check_field_limits(self)


def check_field_limits(request: GenerationRequest) -> None:
    """InvalidArgument for the first field over its limit (`FIELD_LIMITS`)."""
    for name, value in (("request_id", request.request_id), ("model", request.model),
                        ("idempotency_key", request.idempotency_key), ("user", request.user),
                        ("prompt", request.prompt or "")):
        _check_chars(name, value)
    if request.request_id and not REQUEST_ID.match(request.request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if request.messages is not None:
        limit = FIELD_LIMITS["messages"]
        assert limit.entries is not None
        if not 1 <= len(request.messages) <= limit.entries:
            raise InvalidArgument("messages", f"must hold 1..{limit.entries} messages")
        for index, turn in enumerate(request.messages):
            _check_chars("messages.role", turn.role, f"messages[{index}].role")
        total = sum(len(turn.content) for turn in request.messages)
        if total > limit.chars:
            raise InvalidArgument(
                "messages", f"must hold at most {limit.chars} characters of content in all, "
                f"got {total}")
    response_format = request.response_format
    if response_format.type not in RESPONSE_FORMAT_TYPES:
        raise InvalidArgument("response_format.type", f"must be one of {RESPONSE_FORMAT_TYPES}")
    _check_chars("response_format.json_schema", response_format.json_schema)
    _check_chars("response_format.name", response_format.name)
    _check_tools(request)
    for name, words in (("params.stop", request.sampling.stop),
                        ("params.bad_words", request.sampling.bad_words)):
        limit = FIELD_LIMITS[name]
        if limit.entries is not None and len(words) > limit.entries:
            raise InvalidArgument(name, f"at most {limit.entries} entries, got {len(words)}")
        for index, word in enumerate(words):
            if not 1 <= len(word) <= limit.chars:
                raise InvalidArgument(f"{name}[{index}]", f"must be 1..{limit.chars} characters")
    check_logit_bias(request.sampling.logit_bias)


def check_logit_bias(logit_bias: tuple[tuple[int, float], ...]) -> None:
    """At most `MAX_LOGIT_BIAS` entries, each a non-negative id with a bias in range (whether the
    id is in the vocabulary is the version's to say: `validation.prepare_prompt`)."""
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument("params.logit_bias",
                              f"at most {MAX_LOGIT_BIAS} entries, got {len(logit_bias)}")
    low, high = LOGIT_BIAS_RANGE
    for token, bias in logit_bias:
        if token < 0:
            raise InvalidArgument("params.logit_bias", f"token id {token} is negative")
        if not low <= bias <= high:  # NaN too
            raise InvalidArgument(
                "params.logit_bias", f"bias of token {token} must be in [{low:g}, {high:g}], "
                f"got {bias}")


def _check_chars(name: str, value: str, field_name: str | None = None) -> None:
    limit = FIELD_LIMITS[name].chars
    if len(value) > limit:
        raise InvalidArgument(field_name or name,
                              f"must be at most {limit} characters, got {len(value)}")


def _check_tools(request: GenerationRequest) -> None:
    limit = FIELD_LIMITS["tools"]
    assert limit.entries is not None
    if len(request.tools) > limit.entries:
        raise InvalidArgument("tools", f"at most {limit.entries} tools, got {len(request.tools)}")
    for index, tool in enumerate(request.tools):
        if not TOOL_NAME.match(tool.name):
            raise InvalidArgument(f"tools[{index}].function.name",
                                  "must be 1-64 characters of A-Z a-z 0-9 _ -")
    total = sum(len(tool.description) + len(tool.parameters) for tool in request.tools)
    if total > limit.chars:
        raise InvalidArgument("tools", f"must hold at most {limit.chars} characters of "
                              f"descriptions and parameters in all, got {total}")
    if request.tool_choice not in ("", *TOOL_CHOICES):
        raise InvalidArgument("tool_choice", f"must be one of {TOOL_CHOICES}")
    if len(request.tool_choice_name) > FIELD_LIMITS["tools.name"].chars:
        raise InvalidArgument("tool_choice", "names a function of at most 64 characters")
