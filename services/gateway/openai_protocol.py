"""The OpenAI HTTP API's request bodies as pydantic models, and their mapping onto our own
`GenerationRequest` (no HTTP here).

Every model forbids unknown fields: a parameter we do not implement (`functions`, …) is refused
with a 400 naming it, never silently ignored. Fields OpenAI defines that we accept only at their
neutral value (`echo`, `best_of`) are declared and checked in `unsupported_values`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import InvalidArgument
from services.gateway.requests import (
    MAX_LOGIT_BIAS,
    ChatTurn,
    GenerationRequest,
    ResponseFormat,
    SamplingRequest,
)
from services.gateway.tool_calls import Tool, ToolCall, calls_text

MAX_COMPLETION_LOGPROBS = 5  # a legacy completion's `logprobs` (OpenAI's limit)
# OpenAI's newer name for the system role; our chat templates know `system`.
ROLE_ALIASES = {"developer": "system"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str


class ToolCallBody(_Body):
    """An earlier call, in an assistant message sent back with the tool's result."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None  # None only beside tool_calls
    tool_calls: list[ToolCallBody] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message's: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def turn(self) -> ChatTurn:
        """The message as the model reads it: earlier calls in the form it writes them."""
        text = self.text()
        if self.tool_calls:
            calls = calls_text(tuple(ToolCall(c.function.name, c.function.arguments)
                                     for c in self.tool_calls))
            text = f"{text}\n{calls}" if text else calls
        return ChatTurn(ROLE_ALIASES.get(self.role, self.role), text)


class FunctionBody(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # forced calls always follow it; others are parsed as given


class ToolBody(_Body):
    type: Literal["function"]
    function: FunctionBody


class ChosenFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ChosenFunction


class JsonSchemaFormat(_Body):
    """`response_format.json_schema`: the schema is always followed (`strict` changes nothing:
    decoding is constrained either way)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatBody(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    """Parameters the two endpoints share; `top_k`, `min_tokens` and `repetition_penalty` are the
    common extensions (vLLM, TGI) that load tools send to pin output lengths."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) → bias
    user: str = ""
    n: int | None = None


class CompletionBody(_Sampling):
    prompt: str
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None  # 0..5: the chosen token's and this many top ones'


class ChatCompletionBody(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormatBody | None = None
    tools: list[ToolBody] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


def parse_body(model: type[_Body], raw: Any) -> Any:
    """The body as `model`; a wrong or unknown field is an `InvalidArgument` naming it."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = param_path(first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise InvalidArgument(field, "is not supported by this API") from None
        raise InvalidArgument(field, first["msg"]) from None


def param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's location → OpenAI's `param` spelling, e.g. `messages[0].content`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]", "NamedToolChoice",
                      "literal['none','auto','required']"):  # pydantic's union branch names
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def unsupported_values(body: CompletionBody | ChatCompletionBody) -> None:
    """Refuses what OpenAI defines but our engines cannot give, naming the parameter."""
    if isinstance(body, ChatCompletionBody):
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise InvalidArgument("max_completion_tokens", "set max_tokens or it, not both")
    else:
        if body.echo:
            raise InvalidArgument("echo", "echoing the prompt is not supported")
        if body.best_of not in (None, 1):
            raise InvalidArgument("best_of", "only best_of=1 is supported")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidArgument("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}], "
                                  f"got {body.logprobs}")
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("stream_options", "is only allowed with stream=true")


def request_timeout(header: str | None) -> float | None:
    """`X-Request-Timeout` (seconds): the generation's deadline, as `GenerateRequest.timeout` on
    gRPC (the gateway's default when absent; its maximum is checked with the other limits)."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument("timeout", "must be a positive number of seconds")
    return seconds


def to_generation(
    body: CompletionBody | ChatCompletionBody, request_id: str, idempotency_key: str,
    timeout_s: float | None = None,
) -> GenerationRequest:
    """The same `GenerationRequest` the gRPC front builds for these parameters."""
    unsupported_values(body)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    max_tokens = body.max_tokens
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    response_format = ResponseFormat()
    tools: tuple[Tool, ...] = ()
    tool_choice, tool_choice_name = "", ""
    parallel = True
    if isinstance(body, ChatCompletionBody):
        response_format = _response_format(body.response_format)
        if body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        messages = tuple(m.turn() for m in body.messages)
        logprobs, top_logprobs = bool(body.logprobs), body.top_logprobs
        tools = tuple(Tool(t.function.name, t.function.description or "",
                           json.dumps({"type": "object"} if t.function.parameters is None
                                      else t.function.parameters, separators=(",", ":")))
                      for t in body.tools or ())
        tool_choice, tool_choice_name = "", ""
        if isinstance(body.tool_choice, NamedToolChoice):
            tool_choice, tool_choice_name = "function", body.tool_choice.function.name
        elif body.tool_choice is not None:
            tool_choice = body.tool_choice
        parallel = body.parallel_tool_calls is not False
    else:
        prompt = body.prompt
        logprobs, top_logprobs = body.logprobs is not None, body.logprobs
    return GenerationRequest(
        request_id=request_id,
        model=body.model,
        prompt=prompt,
        messages=messages,
        sampling=SamplingRequest(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, stop=stop, seed=body.seed,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, min_tokens=body.min_tokens,
            logit_bias=_logit_bias(body.logit_bias),
            logprobs=logprobs, top_logprobs=top_logprobs,
            n=1 if body.n is None else body.n,
        ),
        idempotency_key=idempotency_key,
        user=body.user,
        timeout_s=timeout_s,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        parallel_tool_calls=parallel,
    )


def _logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (JSON keys, so strings) → (id, bias) pairs ascending by id;
    the count is checked before the keys are parsed, the ranges by `GenerationRequest`."""
    if not raw:
        return ()
    if len(raw) > MAX_LOGIT_BIAS:
        raise InvalidArgument("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(raw)}")
    pairs = []
    for key, bias in raw.items():
        if not key.isascii() or not key.isdigit() or len(key) > 10:
            raise InvalidArgument("logit_bias", f"keys must be token ids, got {key[:32]!r}")
        pairs.append((int(key), bias))
    return tuple(sorted(pairs))


def _response_format(body: ResponseFormatBody | None) -> ResponseFormat:
    """`response_format` in our terms: the schema as compact JSON text (its size is bounded with
    the other fields when the request is built)."""
    if body is None or body.type == "text":
        return ResponseFormat()
    if body.type == "json_object":
        return ResponseFormat("json_object")
    if body.json_schema is None:
        raise InvalidArgument("response_format.json_schema", "is required with type json_schema")
    schema = body.json_schema.json_schema
    return ResponseFormat("json_schema", json.dumps({} if schema is None else schema,
                                                    separators=(",", ":")),
                          body.json_schema.name)


def openai_param(field: str, body: CompletionBody | ChatCompletionBody | None) -> str:
    """Our validation's field name → the parameter the client sent."""
    name = field.removeprefix("params.")
    if (name == "max_tokens" and isinstance(body, ChatCompletionBody)
            and body.max_completion_tokens is not None):
        return "max_completion_tokens"
    return {"request_id": "X-Request-Id", "idempotency_key": "Idempotency-Key",
            "timeout": "X-Request-Timeout"}.get(name, name)
