"""The gateway's own view of a generation request and of who sent it (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.auth import Principal

__all__ = ["ChatTurn", "GenerationRequest", "Principal", "SamplingRequest"]


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


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    idempotency_key: str = ""
    priority: int = 0
    user: str = ""
    timeout_s: float | None = None
