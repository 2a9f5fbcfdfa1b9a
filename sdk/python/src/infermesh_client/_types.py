"""What the client returns: plain frozen dataclasses, no protobuf types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Message:
    """One chat turn; the gateway renders a conversation with the model's chat template."""

    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Answered from the gateway's response cache (the tenant's plan has it; the request was
    # deterministic): no engine ran and the tenant was not charged.
    cached: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds, as the gateway measured them."""

    queue: float  # admission and routing, before the engine
    time_to_first_token: float
    total: float


@dataclass(frozen=True)
class Generation:
    """A finished generation."""

    text: str
    finish_reason: str  # stop | length | content_filter | cancelled | deadline | error
    usage: Usage
    timings: Timings
    model_version: str  # the version id that served it ("sha256:…")
    request_id: str


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed generation. The last delta of a stream has `text` "" and
    `result` set to the whole `Generation`; every other one has `result` None."""

    text: str  # the new text since the previous delta
    result: Optional[Generation] = None


@dataclass(frozen=True)
class ModelInfo:
    """A model as the gateway serves it now."""

    name: str
    production_version: str
    context_window: int
    max_output_tokens: int
    description: str
    canary_version: str  # "" when no canary runs
    canary_weight_percent: float
    cost_per_1k_input_tokens: float
    cost_per_1k_output_tokens: float
