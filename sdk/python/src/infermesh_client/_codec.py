"""Arguments → protobuf requests, protobuf replies → the client's dataclasses."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from infermesh_client import _proto
from infermesh_client._errors import duration_seconds
from infermesh_client._types import Generation, Message, ModelInfo, Timings, Usage

MessageLike = Union[Message, Mapping[str, str], Sequence[str]]


@dataclass(frozen=True)
class GenerationArgs:
    """One logical generation as the caller asked for it; `request()` makes each attempt's
    message (the same ids every time, the timeout what is left of the deadline)."""

    model: str
    prompt: Optional[str]
    messages: Optional[tuple[Message, ...]]
    sampling: dict[str, Any]
    request_id: str
    idempotency_key: str
    user: str
    priority: str

    def request(self, timeout: Optional[float]) -> Any:
        request = _proto.GenerateRequest(
            request_id=self.request_id, model=self.model, idempotency_key=self.idempotency_key,
            user=self.user, params=_proto.SamplingParams(**self.sampling))
        if self.messages is not None:
            request.messages.messages.extend(
                _proto.ChatMessage(role=m.role, content=m.content) for m in self.messages)
        else:
            request.prompt = self.prompt or ""
        if self.priority:
            request.priority = _PRIORITY_VALUES[self.priority]
        if timeout is not None:
            request.timeout.FromNanoseconds(max(int(timeout * 1e9), 1_000_000))
        return request


_PRIORITY_VALUES = {name[len("PRIORITY_"):].lower(): number
                    for number, name in _proto.PRIORITIES.items() if number}


def generation_args(
    model: str, prompt: Optional[str], messages: Optional[Iterable[MessageLike]],
    *, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
    top_p: Optional[float] = None, top_k: Optional[int] = None, seed: Optional[int] = None,
    stop: Union[str, Sequence[str], None] = None, min_tokens: Optional[int] = None,
    user: str = "", priority: str = "", request_id: Optional[str] = None,
    idempotency_key: Optional[str] = None,
) -> GenerationArgs:
    if (prompt is None) == (messages is None):
        raise TypeError("pass exactly one of prompt= and messages=")
    if priority and priority not in _PRIORITY_VALUES:
        raise ValueError(f"priority must be one of {sorted(_PRIORITY_VALUES)}, not {priority!r}")
    sampling: dict[str, Any] = {
        name: value for name, value in (
            ("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
            ("top_k", top_k), ("seed", seed), ("min_tokens", min_tokens),
        ) if value is not None
    }
    if stop is not None:
        sampling["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return GenerationArgs(
        model=model, prompt=prompt,
        messages=None if messages is None else tuple(_message(m) for m in messages),
        sampling=sampling,
        request_id=request_id or uuid.uuid4().hex,
        # Once per logical call: every retry of it is the same generation to the gateway.
        idempotency_key=idempotency_key or uuid.uuid4().hex,
        user=user, priority=priority,
    )


def _message(value: MessageLike) -> Message:
    if isinstance(value, Message):
        return value
    if isinstance(value, Mapping):
        return Message(role=value["role"], content=value["content"])
    role, content = value
    return Message(role=role, content=content)


def finish_reason(number: int) -> str:
    return _proto.FINISH_REASONS.get(number, "FINISH_REASON_UNSPECIFIED").lower()


def _timings(message: Any) -> Timings:
    return Timings(queue=duration_seconds(message.queue),
                   time_to_first_token=duration_seconds(message.time_to_first_token),
                   total=duration_seconds(message.total))


def _usage(message: Any) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens,
                 completion_tokens=message.completion_tokens, cached=message.cached)


def from_response(reply: Any) -> Generation:
    return Generation(text=reply.text, finish_reason=finish_reason(reply.finish_reason),
                      usage=_usage(reply.usage), timings=_timings(reply.timings),
                      model_version=reply.model_version, request_id=reply.request_id)


def from_final(final: Any, text: str, model_version: str) -> Generation:
    return Generation(text=text, finish_reason=finish_reason(final.finish_reason),
                      usage=_usage(final.usage), timings=_timings(final.timings),
                      model_version=final.model_version or model_version,
                      request_id=final.request_id)


def model_info(message: Any) -> ModelInfo:
    return ModelInfo(
        name=message.name, production_version=message.production_version,
        context_window=message.context_window, max_output_tokens=message.max_output_tokens,
        description=message.description, canary_version=message.canary_version,
        canary_weight_percent=message.canary_weight_percent,
        cost_per_1k_input_tokens=message.cost_per_1k_input_tokens,
        cost_per_1k_output_tokens=message.cost_per_1k_output_tokens,
    )
