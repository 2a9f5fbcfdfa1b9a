"""The reference engine: deterministic, readable text with the step physics of an inflight batcher.

Where no GPU exists, Triton hosts this engine behind the TensorRT-LLM tensor interface so the mesh
can be built, tested and benchmarked against a backend that behaves like one: prefill costs time
per prompt token, every decode step advances all active requests by one token and takes longer as
the batch grows, requests hold blocks of a paged KV cache and wait when the batch or the cache is
full, block-aligned prefixes stay cached for later requests (a hit skips that part of prefill),
and cancelled requests leave at once, freeing their blocks. The text is English chosen
deterministically from (seed, prompt), so tests can compare exact output and people can read
what streams by. This module is pure Python (no Triton, no clock):
the Triton model drives `ReferenceEngine.step()` from one thread and sleeps the modelled time.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.kv_blocks import (
    DEFAULT_BLOCK_TOKENS,
    block_hashes,
    chain_root,
    word_token_ids,
)
from services.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    merge_stores,
)
from services.common.structured_output import grammar_of

__all__ = [
    "CORPUS",
    "Completion",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "KvBlockPool",
    "ReferenceEngine",
    "StepResult",
    "StepTiming",
    "TokenOutput",
    "complete",
    "count_tokens",
    "guided_text",
    "made_up_logprobs",
    "minimal_instance",
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


GUIDED_PIECE_CHARS = 4  # characters per token of a guided text


def guided_text(guide_type: str, guide: str, max_tokens: int) -> str:
    """The text a guided request produces: the smallest instance of its schema, as compact JSON,
    cut at what `max_tokens` can carry (the request then finishes for length). Built lazily, so
    a schema whose smallest instance is huge (`minLength: 10**9`, nested `minItems`) costs only
    the part sent. ValueError for a guide the engines cannot compile (the torch engine's rule)."""
    grammar_of(guide_type, guide)
    schema = json.loads(guide) if guide_type == "json_schema" else {"type": "object"}
    budget = max_tokens * GUIDED_PIECE_CHARS
    text: list[str] = []
    for chunk in minimal_instance(schema, schema):
        text.append(chunk[:budget])
        budget -= len(text[-1])
        if budget <= 0:
            break
    return "".join(text)


_CHUNK_CHARS = 4096  # the longest piece of a long string the instance yields at once


def minimal_instance(schema: Any, root: Any, depth: int = 0) -> Iterator[str]:
    """A small value valid against `schema`, as compact JSON text in pieces (each at most
    `_CHUNK_CHARS` or one `const`/`enum` value, and never empty) for what structured output
    uses: types, required properties, `enum`/`const`, `anyOf`/`oneOf`/`allOf` (the first
    branch), local `$ref`s, `minItems`, `minLength`, `minimum`. A made-up answer for the
    simulator, not a solver: `pattern` and `format` are not honoured."""
    if depth > 32 or not isinstance(schema, dict):
        yield "null"
        return
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#").strip("/").split("/"):
            target = target.get(part, {}) if part and isinstance(target, dict) else target
        yield from minimal_instance(target, root, depth + 1)
        return
    if "const" in schema or schema.get("enum"):
        yield _compact(schema["const"] if "const" in schema else schema["enum"][0])
        return
    for combinator in ("anyOf", "oneOf", "allOf"):
        if schema.get(combinator):
            yield from minimal_instance(schema[combinator][0], root, depth + 1)
            return
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0] if kind else "object"
    if kind == "object":
        properties = schema.get("properties", {})
        yield "{"
        for index, name in enumerate(dict.fromkeys(schema.get("required", []))):
            yield ("," if index else "") + _compact(name) + ":"
            yield from minimal_instance(properties.get(name, {}), root, depth + 1)
        yield "}"
    elif kind == "array":
        yield "["
        for index in range(int(schema.get("minItems", 0))):
            if index:
                yield ","
            yield from minimal_instance(schema.get("items", {}), root, depth + 1)
        yield "]"
    elif kind == "string":
        yield '"'
        remaining = int(schema.get("minLength", 0))
        while remaining > 0:
            yield "a" * min(remaining, _CHUNK_CHARS)
            remaining -= _CHUNK_CHARS
        yield '"'
    elif kind in ("integer", "number"):
        value = schema.get("minimum", 0)
        if "exclusiveMinimum" in schema:
            value = math.floor(schema["exclusiveMinimum"]) + 1
        value = min(value, schema.get("maximum", value))
        yield _compact(math.ceil(value) if kind == "integer" else value)
    else:
        yield _compact({"boolean": False, "null": None}.get(kind))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _guided_pieces(text: str) -> list[str]:
    return [text[i:i + GUIDED_PIECE_CHARS] for i in range(0, len(text), GUIDED_PIECE_CHARS)]


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


_WORDS = sorted({" " + word for sentence in CORPUS for word in sentence.split()})


def made_up_logprobs(token: str, top: int) -> tuple[float, tuple[tuple[str, float], ...]]:
    """A generated word's log probability and the `top` most likely words' at its step, made
    up but well formed: a function of the word alone, the chosen word first with the largest,
    the others corpus words in decreasing order, all together a probability below 1 (the
    engine decodes greedily in spirit: what it chose is what it found most likely)."""
    digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
    chosen = -0.05 - 0.45 * digest[0] / 255  # p between 0.61 and 0.95
    words = [w for w in _WORDS if w != token]
    start = int.from_bytes(digest[1:5], "little")
    others = [(words[(start + 7 * i) % len(words)], chosen - 1.5 - i - digest[5 + i % 3] / 255)
              for i in range(max(0, top - 1))]
    return chosen, (((token, chosen), *others) if top else ())


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
    kv_cache_blocks: int = 4096  # the KV pool; defaults large enough that only the batch limits
    kv_block_tokens: int = DEFAULT_BLOCK_TOKENS  # tokens per block (TRT-LLM's tokens_per_block)

    def __post_init__(self) -> None:
        for name in ("max_active_requests", "kv_cache_blocks", "kv_block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it; construction rejects what the engine cannot run."""

    request_id: int  # chosen by the caller, unique among the engine's unfinished requests
    prompt: str
    max_tokens: int
    seed: int = 0
    min_tokens: int = 0  # no natural end before this; stop strings and max_tokens still apply
    stop: tuple[str, ...] = ()  # the text ends before the first one found, which is not emitted
    # Only requests with the same salt share prefix-cache blocks (vLLM's `cache_salt`): the
    # gateway sets the tenant's when its plan isolates its prefix cache.
    cache_salt: str = ""
    # Penalties and logit_bias, which a simulator cannot apply to a real distribution: any
    # setting other than the neutral one picks other text, the same for the same setting.
    sampling_key: str = ""
    # Structured output: the whole text to produce (`guided_text`), a few characters a token.
    guided_text: str | None = None
    # A continuation: the ids of the tokens this request's original generation already produced
    # (on a replica that failed). The text goes on after them exactly as the original would
    # have, its stop strings matched across the seam; `max_tokens` counts the new tokens only,
    # `min_tokens` the original's.
    continued: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(token < 0 for token in self.continued):
            raise ValueError("continue_ids must be token ids (not negative)")
        if self.continued and self.guided_text is not None:
            raise ValueError("continue_ids cannot continue structured output")


class FinishReason(enum.Enum):
    STOP = "stop"  # the text ended naturally or hit a stop string
    LENGTH = "length"  # max_tokens was reached


@dataclass(frozen=True)
class TokenOutput:
    """What one step produced for one request."""

    request_id: int
    delta: str  # new text to emit; empty while text is held back as a possible stop-string prefix
    num_output_tokens: int  # tokens generated so far, stop-string tokens included (they cost steps)
    token_id: int  # the token this step generated (its id: services.common.kv_blocks)
    finish_reason: FinishReason | None  # set on the request's last output, which is then forgotten
    first_token: bool  # this step produced the request's first token (time-to-first-token)
    kv_cache_reused_blocks: int  # prompt blocks its first admission found in the prefix cache
    token: str = ""  # the word this step generated, with its leading space


@dataclass(frozen=True)
class StepResult:
    outputs: list[TokenOutput]
    duration_s: float  # modelled wall time of this step: the caller sleeps it before delivering
    prefilled_tokens: int = 0  # tokens the step's prefills computed (what its time paid for)
    cached_tokens: int = 0  # tokens those prefills found in the prefix cache instead


@dataclass(frozen=True)
class EngineStats:
    """Named like TensorRT-LLM's `nv_trt_llm_request_metrics{request_type=...}` and
    `nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=...}` (as the torch engine's)."""

    active: int
    max: int
    waiting: int
    scheduled: int  # requests the last step ran (0 when idle)
    context: int  # requests the last step prefilled (0 when idle)
    kv_max: int
    kv_used: int  # held by unfinished requests
    kv_free: int  # kv_max - kv_used: cached prefixes count as free (they are evicted on demand)
    kv_reused: int  # unreferenced blocks kept for prefix reuse
    kv_tokens_per: int

    @property
    def kv_fraction(self) -> float:
        return self.kv_used / self.kv_max


class KvBlockPool:
    """A fixed pool of KV blocks with a prefix cache, as vLLM's and TensorRT-LLM's block managers.

    A block is in use (refcount > 0, shared by every request whose prefix it holds), free and
    cached (refcount 0 but still indexed by its hash, so a later request with the same prefix
    reuses it), or free and empty. New blocks come from the empty ones first, then by evicting
    the least recently released cached block.

    Every change to what the prefix cache can find is an event in `events` (the pool starts
    with `AllBlocksCleared`), for the engine to publish: a block is stored when it is indexed,
    removed when it is evicted.
    """

    def __init__(self, num_blocks: int, block_tokens: int):
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.events: list[KvEvent] = [AllBlocksCleared()]
        self._refcount = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}  # the prefix cache: hash -> block holding it
        self._empty = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first

    @property
    def free(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def cached_free(self) -> int:
        return len(self._evictable)

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached leading run of `hashes`."""
        blocks = []
        for block_hash in hashes:
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def in_use(self, block: int) -> bool:
        return self._refcount[block] > 0

    def acquire(self, block: int) -> None:
        """Shares a cached block with one more request."""
        if self._refcount[block] == 0:
            del self._evictable[block]
        self._refcount[block] += 1

    def allocate(self) -> int:
        """A block for new content; evicts the least recently used cached block if need be."""
        if self._empty:
            block = self._empty.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            evicted = self._hash[block]
            assert evicted is not None  # only indexed blocks are evictable
            del self._by_hash[evicted]
            self._hash[block] = None
            self.events.append(BlockRemoved((evicted,)))
        else:
            raise RuntimeError("no free KV block")  # callers check `free` first
        self._refcount[block] = 1
        return block

    def register(self, block: int, block_hash: int, parent: int | None) -> None:
        """Makes a computed block (`parent`: its parent's hash) findable by later requests; a
        duplicate of a block already cached stays unindexed (and becomes empty when released)."""
        if block_hash not in self._by_hash and self._hash[block] is None:
            self._hash[block] = block_hash
            self._by_hash[block_hash] = block
            self.events.append(BlockStored((block_hash,), parent, self.block_tokens))

    def release(self, blocks: Sequence[int]) -> None:
        """Drops one request's hold on `blocks`, last block first: a request's tail is evicted
        before its head, because a cached block is useless once the block before it is gone."""
        for block in reversed(blocks):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if self._hash[block] is None:
                    self._empty.append(block)
                else:
                    self._evictable[block] = None


class _Sequence:
    """One request's generation state: the lazy word stream and the held-back stop-string prefix."""

    def __init__(self, request: GenerationRequest, max_tokens: int):
        """`max_tokens`: the request's, or fewer when the KV pool cannot hold that many.

        A continuation replays its `continued` tokens first: the same seeded word stream gives
        the same words, so the text goes on as the original's would have (ValueError if they are
        not this request's words, or if its text had already ended)."""
        self.request = request
        self.continued = len(request.continued)
        self.max_tokens = self.continued + max_tokens
        rng = _rng_for(request.seed, request.prompt + request.sampling_key)
        target = rng.randint(MIN_NATURAL_TOKENS, MAX_NATURAL_TOKENS)
        self.target_tokens = max(target, request.min_tokens)
        self.words = _word_stream(rng)
        if request.guided_text is not None:
            pieces = _guided_pieces(request.guided_text)
            self.words, self.target_tokens = iter(pieces), len(pieces)
        self.generated = 0
        self.pending = ""  # generated text not emitted yet because it may start a stop string
        # prompt and generated words' token ids: what the KV holds
        self.tokens = word_token_ids(request.prompt.split())
        self.blocks: list[int] = []  # KV blocks held, in token order
        self.hashes: list[int] = []  # hashes of the full blocks computed so far
        self.kv_cache_reused_blocks = 0
        for position, token in enumerate(request.continued):
            output = self.advance()
            if output.token_id != token or output.finish_reason is not None:
                raise ValueError(f"continue_ids[{position}] does not continue this request's "
                                 f"text (seed and prompt must be the original's)")

    def advance(self) -> TokenOutput:
        """Generates one token and decides what of the text so far can be emitted."""
        word = next(self.words)
        self.generated += 1
        [token_id] = word_token_ids((word.lstrip(),))
        self.tokens.append(token_id)
        self.pending += word
        request = self.request
        finish: FinishReason | None = None
        delta = ""
        stop_at = self._first_stop()
        if stop_at is not None:
            delta, finish = self.pending[:stop_at], FinishReason.STOP
        elif self.generated >= self.max_tokens:
            delta, finish = self.pending, FinishReason.LENGTH
        elif self.generated >= self.target_tokens and (
                word.endswith(".") or self.request.guided_text is not None):
            delta, finish = self.pending, FinishReason.STOP
        else:
            keep_from = self._held_back_from()
            delta, self.pending = self.pending[:keep_from], self.pending[keep_from:]
        return TokenOutput(request.request_id, delta, self.generated - self.continued,
                           token_id, finish, self.generated == self.continued + 1,
                           self.kv_cache_reused_blocks, word)

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
    """An inflight batcher over a paged KV cache: each `step()` grows the running requests' KV,
    admits waiting requests FCFS while batch slots and blocks allow, and advances every running
    request by one token.

    A running request holds ceil(tokens / kv_block_tokens) blocks (tokens: prompt + generated),
    and before each step enough for one more token. When the pool cannot give a running request
    its next block, the newest running request is preempted, as vLLM does: its blocks are
    released and it goes back to the front of the queue, to be prefilled again (prompt and the
    tokens generated so far; its own blocks usually still sit in the prefix cache) and resume
    its text unchanged. Preempting, rather than reserving prompt + max_tokens up front, keeps
    the pool full of useful work when max_tokens is a loose bound, which it usually is. A
    request's max_tokens is clipped to what the whole pool can hold after its prompt (as
    TensorRT-LLM clips to max_seq_len), so a request alone always fits; a prompt that can never
    fit is refused.

    Not thread-safe: one thread owns it (the Triton model's dispatcher). Requests finish by
    producing an output with a `finish_reason`, or leave early through `abort_request()`.
    """

    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self._pool = KvBlockPool(config.kv_cache_blocks, config.kv_block_tokens)
        self._waiting: OrderedDict[int, _Sequence] = OrderedDict()  # the FCFS queue
        self._active: dict[int, _Sequence] = {}  # in admission order: the newest last
        self._last_scheduled = 0
        self._last_context = 0

    def add_request(self, request: GenerationRequest) -> None:
        """Queues a request; it joins the batch at the first step with a free slot and blocks.

        ValueError if its prompt (and the token it generates first) can never fit the pool.
        """
        if request.request_id in self._active or request.request_id in self._waiting:
            raise ValueError(f"request {request.request_id} is already in the engine")
        prompt_tokens = count_tokens(request.prompt) + len(request.continued)
        room = self.config.kv_cache_blocks * self.config.kv_block_tokens - prompt_tokens
        if room < 1:
            raise ValueError(
                f"the prompt needs {self._blocks_for(prompt_tokens + 1)} KV blocks of "
                f"{self.config.kv_block_tokens} tokens; the cache holds at most "
                f"kv_cache_blocks={self.config.kv_cache_blocks}")
        self._waiting[request.request_id] = _Sequence(request, min(request.max_tokens, room))

    def abort_request(self, request_id: int) -> bool:
        """Drops a waiting or active request at once (cancellation), freeing its KV blocks;
        False if it is not here."""
        sequence = self._active.pop(request_id, None) or self._waiting.pop(request_id, None)
        if sequence is None:
            return False
        self._release(sequence)
        return True

    def kv_events(self) -> list[KvEvent]:
        """The prefix cache's changes since the last call, in order (consecutive stores of one
        chain merged); the first call starts with `AllBlocksCleared`."""
        events, self._pool.events = merge_stores(self._pool.events), []
        return events

    def has_unfinished_requests(self) -> bool:
        return bool(self._active or self._waiting)

    def step(self) -> StepResult:
        """One iteration: grow or preempt, admit and prefill, then one token for each running
        request.

        A newly admitted request gets its first token in the step that prefills it, as in
        TensorRT-LLM's inflight batching, so its step costs the prefill of its uncached tokens on
        top of the decode.
        """
        # As vLLM: no admission in a step that preempted, which would only thrash the pool.
        admitted = [] if self._grow_running() else self._admit_waiting()
        timing = self.config.timing
        duration = timing.decode_step_seconds(len(self._active)) if self._active else 0.0
        prefilled = sum(uncached for _, uncached, _ in admitted)
        duration += timing.prefill_seconds(prefilled)
        self._last_scheduled, self._last_context = len(self._active), len(admitted)
        outputs = []
        for sequence in list(self._active.values()):
            output = sequence.advance()
            outputs.append(output)
            self._register_full_blocks(sequence)
            if output.finish_reason is not None:
                del self._active[output.request_id]
                self._release(sequence)
        cached = sum(hit for _, _, hit in admitted)
        return StepResult(outputs, duration, prefilled, cached)

    @property
    def stats(self) -> EngineStats:
        idle = not self.has_unfinished_requests()
        free = self._pool.free
        return EngineStats(
            active=len(self._active),
            max=self.config.max_active_requests,
            waiting=len(self._waiting),
            scheduled=0 if idle else self._last_scheduled,
            context=0 if idle else self._last_context,
            kv_max=self.config.kv_cache_blocks,
            kv_used=self.config.kv_cache_blocks - free,
            kv_free=free,
            kv_reused=self._pool.cached_free,
            kv_tokens_per=self.config.kv_block_tokens,
        )

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.config.kv_block_tokens)

    def _grow_running(self) -> bool:
        """Gives every running request, oldest first, room for its next token, preempting the
        newest while the pool is short; True if any was preempted."""
        preempted = False
        for sequence in list(self._active.values()):
            if sequence.request.request_id not in self._active:
                continue  # preempted to make room for an older request
            needed = self._blocks_for(len(sequence.tokens) + 1) - len(sequence.blocks)
            while needed > self._pool.free and (newest := self._newest_other(sequence)):
                self._preempt(newest)
                preempted = True
            if needed <= self._pool.free:  # always so for the oldest: alone, a request fits
                sequence.blocks.extend(self._pool.allocate() for _ in range(needed))
            else:  # it is the newest: it waits for the older ones to finish
                self._preempt(sequence)
                preempted = True
        return preempted

    def _newest_other(self, sequence: _Sequence) -> _Sequence | None:
        newest = next(reversed(self._active.values()))
        return None if newest is sequence else newest

    def _preempt(self, sequence: _Sequence) -> None:
        del self._active[sequence.request.request_id]
        self._release(sequence)
        self._waiting[sequence.request.request_id] = sequence
        self._waiting.move_to_end(sequence.request.request_id, last=False)

    def _admit_waiting(self) -> list[tuple[_Sequence, int, int]]:
        """Admits from the head of the queue while a slot and the blocks are free (strict FCFS:
        a head that does not fit blocks the rest); returns (request, uncached tokens, cached
        tokens) admitted."""
        admitted = []
        block_tokens = self.config.kv_block_tokens
        while self._waiting and len(self._active) < self.config.max_active_requests:
            sequence = next(iter(self._waiting.values()))
            tokens = len(sequence.tokens)
            # At least one token is computed: the one whose logits give the next token.
            hashes = block_hashes(sequence.tokens[:tokens - 1], block_tokens,
                                  chain_root(sequence.request.cache_salt))
            hits = self._pool.cached_prefix(hashes)
            hits_free = sum(1 for block in hits if not self._pool.in_use(block))
            needed = self._blocks_for(tokens + 1) - len(hits)
            if needed > self._pool.free - hits_free:
                break
            del self._waiting[sequence.request.request_id]
            for block in hits:
                self._pool.acquire(block)
            sequence.blocks = hits + [self._pool.allocate() for _ in range(needed)]
            sequence.hashes = hashes[:len(hits)]
            if sequence.generated == sequence.continued:
                sequence.kv_cache_reused_blocks = len(hits)
            self._active[sequence.request.request_id] = sequence
            cached = len(hits) * block_tokens
            admitted.append((sequence, tokens - cached, cached))
        for sequence, _, _ in admitted:  # computed by this step: cached for the ones that follow
            self._register_full_blocks(sequence)
        return admitted

    def _register_full_blocks(self, sequence: _Sequence) -> None:
        start = len(sequence.hashes)
        previous = (sequence.hashes[-1] if sequence.hashes
                    else chain_root(sequence.request.cache_salt))
        for offset, block_hash in enumerate(
            block_hashes(sequence.tokens, self.config.kv_block_tokens, previous, start)
        ):
            self._pool.register(sequence.blocks[start + offset], block_hash, previous)
            sequence.hashes.append(block_hash)
            previous = block_hash

    def _release(self, sequence: _Sequence) -> None:
        self._pool.release(sequence.blocks)
        sequence.blocks, sequence.hashes = [], []


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
