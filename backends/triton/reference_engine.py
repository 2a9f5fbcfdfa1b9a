"""The reference engine: deterministic, readable text with the step physics of an inflight batcher.

Where no GPU exists, Triton hosts this engine behind the TensorRT-LLM tensor interface so the mesh
can be built, tested and benchmarked against a backend that behaves like one: prefill costs time
per prompt token, every decode step advances all active requests by one token and takes longer as
the batch grows, requests beyond the batch capacity wait, and cancelled requests leave at once.
The text is English chosen deterministically from (seed, prompt), so tests can compare exact
output and people can read what streams by. This module is pure Python (no Triton, no clock):
the Triton model drives `ReferenceEngine.step()` from one thread and sleeps the modelled time.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "CORPUS",
    "Completion",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "ReferenceEngine",
    "StepResult",
    "StepTiming",
    "TokenOutput",
    "complete",
    "count_tokens",
]

# A small corpus of plain sentences; every sentence ends with its only period, which is how the
# generator knows where a sentence (and so a natural end of the text) is.
CORPUS: tuple[str, ...] = (
    "The morning train left the station a few minutes before the rain began.",
    "A good map shows the roads, the rivers and the places where people live.",
    "She planted tomatoes along the fence because they liked the afternoon sun.",
    "Most bridges in the old town were built of stone and still carry traffic today.",
    "The library opens at nine and closes when the last reader goes home.",
    "Bread rises faster in a warm kitchen than in a cold one.",
    "He wrote the letter twice and sent the shorter version.",
    "Clear instructions save more time than clever shortcuts.",
    "The river turns north after the mill and reaches the sea two days later.",
    "Children in the village learned to swim in the lake every summer.",
    "A quiet room helps most people think about one problem at a time.",
    "The market sells fresh fish in the morning and flowers in the afternoon.",
    "Our neighbours keep bees and share the honey at the end of the season.",
    "The lighthouse keeper checked the lamp every evening at sunset.",
    "Small steps taken every day add up to a long journey.",
    "The museum moved its oldest paintings to a room with softer light.",
    "Snow covered the hills overnight and the roads stayed closed until noon.",
    "A careful cook tastes the soup before adding more salt.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Good tools last for years when they are cleaned and stored with care.",
    "The ferry crosses the bay every hour from spring until late autumn.",
    "Birds gather on the wires before they fly south for the winter.",
    "The old clock in the hall runs a little fast in the summer.",
    "Every map of the coast shows the same three islands near the harbour.",
    "The gardener waters the roses early so the leaves dry before the heat.",
    "A short walk after dinner is an old habit in many families.",
    "The teacher asked each student to read one page aloud.",
    "Fresh paint makes a small room feel larger and brighter.",
    "The baker starts work long before the first customers arrive.",
    "Rain on the roof is a pleasant sound when you are warm inside.",
    "The path through the forest is marked with white stones.",
    "People in the city often cycle to work when the weather is fine.",
)

MIN_NATURAL_TOKENS = 24
"""Shortest text the engine aims for before it may end at a sentence boundary."""
MAX_NATURAL_TOKENS = 96
"""Longest target; the text ends at the first sentence end at or after its seeded target."""


def count_tokens(text: str) -> int:
    """Whitespace split: the engine's tokenizer, and the gateway's estimate of prompt tokens."""
    return len(text.split())


def _rng_for(seed: int, prompt: str) -> random.Random:
    # hashlib, not hash(): str hashes are salted per process and the text must not change.
    digest = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _word_stream(rng: random.Random) -> Iterator[str]:
    """Endless word tokens, each with its leading space; no sentence twice in a row."""
    index = rng.randrange(len(CORPUS))
    while True:
        yield from (" " + word for word in CORPUS[index].split())
        # Uniform over every sentence but the one just used.
        index = (index + 1 + rng.randrange(len(CORPUS) - 1)) % len(CORPUS)


@dataclass(frozen=True)
class StepTiming:
    """The simulated accelerator: prefill is linear in prompt tokens, a step in batch size."""

    prefill_us_per_token: float = 50.0
    decode_step_ms: float = 4.0  # fixed cost of a step: why batching raises throughput
    decode_step_ms_per_request: float = 0.2  # why a bigger batch slows every request a little

    def __post_init__(self) -> None:
        if min(self.prefill_us_per_token, self.decode_step_ms, self.decode_step_ms_per_request) < 0:
            raise ValueError("step timings must not be negative")

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return self.prefill_us_per_token * prompt_tokens / 1e6

    def decode_step_seconds(self, batch: int) -> float:
        return (self.decode_step_ms + self.decode_step_ms_per_request * batch) / 1e3


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes the engine; the Triton model fills it from config.pbtxt."""

    timing: StepTiming = StepTiming()
    max_active_requests: int = 32  # the inflight batch's capacity (TensorRT-LLM's max_batch_size)

    def __post_init__(self) -> None:
        if self.max_active_requests < 1:
            raise ValueError("max_active_requests must be at least 1")


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it; construction rejects what the engine cannot run."""

    request_id: int  # chosen by the caller, unique among the engine's unfinished requests
    prompt: str
    max_tokens: int
    seed: int = 0
    min_tokens: int = 0  # no natural end before this; stop strings and max_tokens still apply
    stop: tuple[str, ...] = ()  # the text ends before the first one found, which is not emitted

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


class FinishReason(enum.Enum):
    STOP = "stop"  # the text ended naturally or hit a stop string
    LENGTH = "length"  # max_tokens was reached


@dataclass(frozen=True)
class TokenOutput:
    """What one step produced for one request."""

    request_id: int
    delta: str  # new text to emit; empty while text is held back as a possible stop-string prefix
    num_output_tokens: int  # tokens generated so far, stop-string tokens included (they cost steps)
    finish_reason: FinishReason | None  # set on the request's last output, which is then forgotten
    first_token: bool  # this step produced the request's first token (time-to-first-token)


@dataclass(frozen=True)
class StepResult:
    outputs: list[TokenOutput]
    duration_s: float  # modelled wall time of this step: the caller sleeps it before delivering


@dataclass(frozen=True)
class EngineStats:
    """Counts named like TensorRT-LLM's `nv_trt_llm_request_metrics{request_type=...}`."""

    active: int
    max: int
    waiting: int
    scheduled: int  # requests the last step ran (0 when idle)
    context: int  # requests the last step prefilled (0 when idle)


class _Sequence:
    """One request's generation state: the lazy word stream and the held-back stop-string prefix."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.prompt_tokens = count_tokens(request.prompt)
        rng = _rng_for(request.seed, request.prompt)
        target = rng.randint(MIN_NATURAL_TOKENS, MAX_NATURAL_TOKENS)
        self.target_tokens = max(target, request.min_tokens)
        self.words = _word_stream(rng)
        self.generated = 0
        self.pending = ""  # generated text not emitted yet because it may start a stop string

    def advance(self) -> TokenOutput:
        """Generates one token and decides what of the text so far can be emitted."""
        word = next(self.words)
        self.generated += 1
        self.pending += word
        request = self.request
        finish: FinishReason | None = None
        delta = ""
        stop_at = self._first_stop()
        if stop_at is not None:
            delta, finish = self.pending[:stop_at], FinishReason.STOP
        elif self.generated >= request.max_tokens:
            delta, finish = self.pending, FinishReason.LENGTH
        elif self.generated >= self.target_tokens and word.endswith("."):
            delta, finish = self.pending, FinishReason.STOP
        else:
            keep_from = self._held_back_from()
            delta, self.pending = self.pending[:keep_from], self.pending[keep_from:]
        return TokenOutput(request.request_id, delta, self.generated, finish, self.generated == 1)

    def _first_stop(self) -> int | None:
        # Text already emitted never holds the start of a match (see _held_back_from), so only
        # the pending text needs searching.
        hits = [i for i in (self.pending.find(s) for s in self.request.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back_from(self) -> int:
        """Index of the earliest pending suffix that could still grow into a stop string."""
        for start in range(len(self.pending)):
            tail = self.pending[start:]
            if any(s.startswith(tail) for s in self.request.stop):
                return start
        return len(self.pending)


class ReferenceEngine:
    """An inflight batcher: each `step()` admits waiting requests and advances every active one.

    Not thread-safe: one thread owns it (the Triton model's dispatcher). Requests finish by
    producing an output with a `finish_reason`, or leave early through `abort_request()`.
    """

    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self._waiting: dict[int, _Sequence] = {}  # insertion-ordered: the FCFS queue
        self._active: dict[int, _Sequence] = {}
        self._last_scheduled = 0
        self._last_context = 0

    def add_request(self, request: GenerationRequest) -> None:
        """Queues a request; it joins the batch at the next step with a free slot (FCFS)."""
        if request.request_id in self._active or request.request_id in self._waiting:
            raise ValueError(f"request {request.request_id} is already in the engine")
        self._waiting[request.request_id] = _Sequence(request)

    def abort_request(self, request_id: int) -> bool:
        """Drops a waiting or active request at once (cancellation); False if it is not here."""
        dropped = self._active.pop(request_id, None) or self._waiting.pop(request_id, None)
        return dropped is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self._active or self._waiting)

    def step(self) -> StepResult:
        """One iteration: prefill the newly admitted requests, then one token for each active one.

        A newly admitted request gets its first token in the step that prefills it, as in
        TensorRT-LLM's inflight batching, so its step costs its prefill on top of the decode.
        """
        admitted: list[_Sequence] = []
        while self._waiting and len(self._active) < self.config.max_active_requests:
            request_id = next(iter(self._waiting))
            sequence = self._active[request_id] = self._waiting.pop(request_id)
            admitted.append(sequence)
        timing = self.config.timing
        duration = timing.decode_step_seconds(len(self._active)) if self._active else 0.0
        duration += sum(timing.prefill_seconds(s.prompt_tokens) for s in admitted)
        self._last_scheduled, self._last_context = len(self._active), len(admitted)
        outputs = [sequence.advance() for sequence in self._active.values()]
        for output in outputs:
            if output.finish_reason is not None:
                del self._active[output.request_id]
        return StepResult(outputs, duration)

    @property
    def stats(self) -> EngineStats:
        idle = not self.has_unfinished_requests()
        return EngineStats(
            active=len(self._active),
            max=self.config.max_active_requests,
            waiting=len(self._waiting),
            scheduled=0 if idle else self._last_scheduled,
            context=0 if idle else self._last_context,
        )


@dataclass(frozen=True)
class Completion:
    text: str
    num_output_tokens: int
    finish_reason: FinishReason


def complete(request: GenerationRequest) -> Completion:
    """The whole text a request produces, without timing: what a non-streaming caller receives."""
    engine = ReferenceEngine(EngineConfig(max_active_requests=1))
    engine.add_request(request)
    pieces: list[str] = []
    while True:
        for output in engine.step().outputs:
            pieces.append(output.delta)
            if output.finish_reason is not None:
                return Completion("".join(pieces), output.num_output_tokens, output.finish_reason)
