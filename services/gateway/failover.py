"""Mid-stream failover: a generation whose replica dies (or stalls) after its first token goes on
on another replica serving the same version, from the tokens already delivered
(docs/decisions.md § "Mid-stream failover").

    relay ──chunks (text + output_ids)──▶ Continuation.received: the ids the client's text covers
      │ Unavailable after the first token: the stream broke, the engine process is gone, or no
      │ chunk came within `stall_s` (a continuation's first within `first_chunk_s`)
      ▼
    Continuation.move(from): the original request with continue_ids = the ids received, the
    max_tokens left, the same prompt, seed and stop strings → routed again (the failed replicas
    excluded); the engine replays the ids, so its text goes on where the client's stopped

The engine counts sampling positions from the original's start, so greedy and seeded output is
the output without the failure, for engines whose sampling is derived from (seed, position)
(`EngineCapabilities.position_sampling`); a sampled generation moved on any other engine says
`exact = False`. A sampled request without a seed gets one drawn here before its first dispatch
(`seeded_to_move`) when its engine would draw its own (`draws_own_seed`): it would draw another on
the next replica.
Bounded by `max_moves`; the request's deadline bounds every attempt. Pure: the pipeline routes,
relays and releases.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

from backends.triton.adapter import EngineChunk, EngineRequest

__all__ = ["Continuation", "FailoverSettings", "Move", "seeded_to_move"]


@dataclass(frozen=True)
class FailoverSettings:
    max_moves: int = 2  # replicas a generation may move to after its first token (0: never)
    stall_s: float = 30.0  # streaming, no chunk for this long: the replica is taken as failed
    # A continuation's first chunk: it prefills the prompt and the moved tokens, maybe queued
    # behind others, so it gets longer than stall_s; missing it says the replica is busy, not
    # broken (its breaker is not charged).
    first_chunk_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_moves < 0 or self.stall_s <= 0 or self.first_chunk_s <= 0:
            raise ValueError("max_moves must not be negative and stall_s and first_chunk_s "
                             "must be positive")


def seeded_to_move(request: EngineRequest, settings: FailoverSettings,
                   position_sampling: bool, draws_own_seed: bool = True) -> EngineRequest:
    """`request` with a seed drawn here when it is sampled, has none, and may move to an engine
    that derives its draws from (seed, position) and would otherwise draw its own seed: its
    continuation then makes the same draws. Called once, before the first dispatch."""
    if (request.temperature and request.seed is None and position_sampling and draws_own_seed
            and settings.max_moves and not request.guided_decoding_guide_type):
        return dataclasses.replace(request, seed=secrets.randbits(63))
    return request


@dataclass
class Move:
    """One move, for the audit record: from which replica, to which, after how many tokens."""

    from_replica: str
    at_token: int
    to_replica: str = ""  # known once the continuation is routed


@dataclass
class Continuation:
    """What a streaming generation has received, and how it moved; one per generation."""

    original: EngineRequest
    settings: FailoverSettings
    position_sampling: bool  # the engine derives sampling from (seed, position)
    draws_own_seed: bool = True  # unseeded, the engine draws a seed of its own (not seed 0's)
    token_ids: list[int] = field(default_factory=list)  # received from every attempt so far
    moves: list[Move] = field(default_factory=list)
    stalled: set[str] = field(default_factory=set)  # replicas left for silence, not for a break
    counted: int = 0  # tokens the attempts before this one generated (the continue_ids sent)
    attempt_tokens: int = 0  # this attempt's completion tokens, as its engine counts them

    def received(self, chunk: EngineChunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        self.attempt_tokens = chunk.completion_tokens or self.attempt_tokens

    @property
    def supported(self) -> bool:
        """Whether the ids received are every token generated: the engine was asked for them
        and sent one id per token it counted (an engine without `output_ids` sends none)."""
        return (self.original.return_output_ids
                and len(self.token_ids) == self.counted + self.attempt_tokens)

    def restart(self) -> None:
        """A retry from the start (the client had no text yet): what was received is moot."""
        self.token_ids.clear()
        self.attempt_tokens = 0

    def completion_tokens(self, chunk: EngineChunk) -> int:
        """The generation's completion tokens so far: the earlier attempts' and this one's."""
        return self.counted + chunk.completion_tokens

    @property
    def remaining(self) -> int:
        return self.original.max_tokens - len(self.token_ids)

    def may_move(self) -> bool:
        """Structured output is never moved: the reference engine cannot continue a guided
        text (the torch engine can: a capability to add before the gateway relies on it)."""
        return (self.supported and not self.original.guided_decoding_guide_type
                and len(self.moves) < self.settings.max_moves)

    def move(self, from_replica: str) -> EngineRequest:
        """The request that continues the generation elsewhere (`remaining` must be > 0)."""
        self.moves.append(Move(from_replica, len(self.token_ids)))
        self.counted, self.attempt_tokens = len(self.token_ids), 0
        return dataclasses.replace(self.original, continue_ids=tuple(self.token_ids),
                                   max_tokens=self.remaining)

    def routed(self, replica_id: str) -> None:
        if self.moves and not self.moves[-1].to_replica:
            self.moves[-1].to_replica = replica_id

    @property
    def exact(self) -> bool:
        """False once a sampled generation moved without a seed, or on an engine whose sampling
        is not derived from (seed, position): its text after the seam is a valid draw, not the
        one it would have been. Greedy output is exact on any engine (a deterministic one)."""
        sampled = bool(self.original.temperature)
        same_draws = self.position_sampling and (self.original.seed is not None
                                                 or not self.draws_own_seed)
        return not (self.moves and sampled and not same_draws)
