"""The torch engine: a real causal LM behind transformers' continuous batching, on CPU or CUDA.

One `TorchEngine` per Triton model instance owns one paged KV cache, sized only from its
`TorchEngineConfig` (blocks, tokens per block, tokens per step; left unset, transformers would
size it from host memory). Requests join the running batch as they come (`submit`); each
`poll` turns the newly decoded tokens into text deltas that never split a character and never
show a stop string; `cancel` frees a request's KV blocks on the next step.

Sampling is per request and independent of the batch: greedy, or temperature/top_k/top_p with a
seed. The seed drives Gumbel noise keyed by (seed, position), added to the request's filtered
logits, and the engine takes the argmax (the Gumbel-max trick draws exactly from the softmax), so
the same seed gives the same text however it is streamed and, up to the arithmetic's rounding,
whatever else is in the batch: a batch's shape can change a matrix product's last bits, and in
bfloat16 that flips a near-tie now and then (docs/decisions.md).

Threads: `submit`, `poll` and `cancel` belong to one caller thread (the Triton model's
dispatcher), which is also the only one to touch the tokenizer; transformers runs its own
generation thread. Block accounting reads transformers' private cache state, which is why
transformers is pinned exactly and `tests/` cover it.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import os
import pathlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import RequestStatus

from backends.triton.guided_decoding import Guide, GuideCompiler
from services.common.kv_blocks import block_hash, chain_root
from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = [
    "DTYPES",
    "Delta",
    "EngineStats",
    "FinishReason",
    "Generation",
    "IncrementalDetokenizer",
    "Sampling",
    "TokenLogprob",
    "TorchEngine",
    "TorchEngineConfig",
    "native_bfloat16",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"  # bfloat16 on a CPU that computes it natively, else float32
_KEY_BITS = 30  # noise keys are non-zero 30-bit integers, each seeding one draw
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
LOGPROBS_OFF = -1  # `Sampling.top_logprobs` when the request asks for no log probabilities
MAX_CACHE_SALT_BYTES = 256  # a tenant id is far shorter


@dataclass(frozen=True)
class TorchEngineConfig:
    """The version's engine config; every KV-cache figure is explicit."""

    num_blocks: int  # KV-cache blocks in this instance's cache
    page_size: int  # tokens per block
    max_batch_tokens: int  # tokens one step may process (prompt chunks + one per decoding request)
    dtype: str = "float32"  # or "auto": bfloat16 where the CPU computes it natively (~2x faster)
    device: str = ""  # "" picks cuda when present, else cpu
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default

    def __post_init__(self) -> None:
        for name in ("num_blocks", "page_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES and self.dtype != AUTO_DTYPE:
            raise ValueError(
                f"dtype must be one of {sorted(DTYPES)} or {AUTO_DTYPE!r}, got {self.dtype!r}")

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def resolved_dtype(self) -> str:
        """`dtype`, with "auto" decided for this machine; a GPU keeps float32 under "auto"."""
        if self.dtype != AUTO_DTYPE:
            return self.dtype
        native = self.resolved_device == "cpu" and native_bfloat16()
        return "bfloat16" if native else "float32"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16), where it is
    ~2x float32's speed (`python -m bench.engine_limit`); elsewhere float32 stays the default."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy (the other sampling fields are then moot)
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None  # None draws a fresh one for a sampled request
    min_tokens: int = 0  # EOS is not allowed before this many tokens
    repetition_penalty: float = 1.0  # HF/vLLM: divides (or multiplies, if negative) seen logits
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # Log probabilities of each chosen token and of this many most likely ones (0: the chosen
    # token's alone; LOGPROBS_OFF: none), from the model's raw distribution.
    top_logprobs: int = LOGPROBS_OFF

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.min_tokens < 0:
            raise ValueError("top_k and min_tokens must not be negative")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias {token}: {bias} is outside [-100, 100]")
        if not LOGPROBS_OFF <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {self.top_logprobs}")


@dataclass(frozen=True)
class Generation:
    request_id: str  # unique among the engine's unfinished requests
    prompt: str
    max_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()  # the text ends before the first one, which is not emitted
    guide: Guide | None = None  # the grammar the text must follow (`TorchEngine.compile_guide`)
    # A continuation: the ids of the tokens the original generation already produced (on a
    # replica that failed). They follow the prompt as context, sampling positions count on from
    # them (so the same seed draws the same tokens), stop strings match across the seam, and
    # `max_tokens` counts the new tokens only (`min_tokens` the original's).
    continued: tuple[int, ...] = ()
    # Only requests with the same salt share prefix-cache blocks (vLLM's `cache_salt`; the
    # gateway sends an isolated tenant's): the salt's hash is its block chains' root.
    cache_salt: str = ""

    def __post_init__(self) -> None:
        if len(self.cache_salt.encode()) > MAX_CACHE_SALT_BYTES:
            raise ValueError(f"cache_salt must be at most {MAX_CACHE_SALT_BYTES} bytes")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability under the model's raw distribution (the
    log-softmax of its logits before temperature, penalties or logit_bias: vLLM's and OpenAI's
    meaning), with the most likely tokens' at that step, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class FinishReason(enum.Enum):
    STOP = "stop"  # end of text or a stop string
    LENGTH = "length"  # max_tokens reached
    ERROR = "error"  # the engine failed the request (the message says why)


@dataclass(frozen=True)
class Delta:
    """What a poll produced for one request: new text, running counts, and maybe its end."""

    request_id: str
    text: str
    num_input_tokens: int
    num_output_tokens: int
    first_token: bool  # this delta carries the request's first generated token
    finish_reason: FinishReason | None = None  # set on the request's last delta only
    error: str = ""
    # ERROR: the request's own fault (the client's INVALID_ARGUMENT), not the engine's.
    refused: bool = False
    # The tokens this delta adds, when the request asked for log probabilities; their text may
    # still be held back (an incomplete character, a possible stop string).
    logprobs: tuple[TokenLogprob, ...] = ()
    token_ids: tuple[int, ...] = ()  # the tokens generated since the request's last delta


@dataclass(frozen=True)
class EngineStats:
    """Named like TensorRT-LLM's `nv_trt_llm_request_metrics` and `..._kv_cache_block_metrics`."""

    active: int  # requests in the running batch
    max: int  # requests one step can decode: min(KV blocks, tokens per step), one each at least
    waiting: int  # queued, not yet admitted to the batch
    scheduled: int  # requests the running batch holds
    context: int  # of those, still prefilling their prompt
    kv_max: int
    kv_used: int  # held by unfinished requests
    kv_free: int  # kv_max - kv_used (cached prefixes count as free: they are evicted on demand)
    kv_reused: int  # unreferenced blocks kept for prefix reuse
    kv_tokens_per: int

    @property
    def kv_fraction(self) -> float:
        return self.kv_used / self.kv_max if self.kv_max else 0.0


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, safely.

    A token may end inside a multi-byte character: its text then ends with U+FFFD and is held
    until the next token completes it. Text that could be the start of a stop string is held
    too, and the text ends before the first stop string found. Pure logic: `decode` is injected.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: tuple[str, ...] = ()):
        self._decode = decode
        self._stop = stop
        self._prefix_offset = 0  # ids decoded only as context, so spaces merge as in the full text
        self._read_offset = 0  # ids whose text is already out (or pending)
        self._pending = ""  # decoded text held back as a possible stop-string prefix
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """New text for `token_ids` (all generated so far); sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        prefix_text = self._decode(token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character, or no text yet: wait for more tokens
        self._pending += new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        return self._release()

    def push_each(self, token_ids: Sequence[int], start: int) -> str:
        """`push` for each id after the first `start`, one at a time: what is released then
        depends on the ids alone, never on how the engine batched them, so a continuation's
        detokenizer fed the ids a client received holds back exactly what the original held."""
        return "".join(self.push(token_ids[:end]) for end in range(start + 1, len(token_ids) + 1))

    def finish(self, token_ids: Sequence[int]) -> str:
        """The rest of the text once the request ended: nothing is held back any more."""
        if self.stopped:
            return ""
        rest = self._decode(token_ids[self._prefix_offset :])
        prefix_text = self._decode(token_ids[self._prefix_offset : self._read_offset])
        self._pending += rest[len(prefix_text) :]
        text = self._release()
        if not self.stopped:
            text, self._pending = text + self._pending, ""
        return text

    def _release(self) -> str:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            text, self._pending = self._pending[: min(hits)], ""
            return text
        keep_from = len(self._pending)
        for start in range(len(self._pending)):
            tail = self._pending[start:]
            if any(s.startswith(tail) for s in self._stop):
                keep_from = start
                break
        text, self._pending = self._pending[:keep_from], self._pending[keep_from:]
        return text


def noise_key(seed: int, position: int) -> int:
    """A non-zero 30-bit key for (seed, position): the same draw for the same request and step."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=4).digest()
    return (int.from_bytes(digest, "little") % ((1 << _KEY_BITS) - 1)) + 1


@dataclass(frozen=True)
class _RowSampling:
    """One batch row's sampling, read from its request when the batch is prepared."""

    temperature: float  # 0: greedy
    top_k: int  # 0: off
    top_p: float  # 1: off
    noise_key: int  # the Gumbel draw's key for this request and step (unused when greedy)
    ban_eos: bool  # below min_tokens (never for a guided row: its grammar says when it ends)
    guide: Guide | None = None  # the request's grammar, when it has one
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_ids: Sequence[int] = ()  # read only when a penalty is set
    generated_ids: Sequence[int] = ()
    request_id: str = ""
    top_logprobs: int = LOGPROBS_OFF

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias or self.repetition_penalty != 1.0
                    or self.presence_penalty or self.frequency_penalty)

    def adjust(self, logits: torch.Tensor) -> None:
        """logit_bias, then the penalties (vLLM's order), in place on one row. The repetition
        penalty covers prompt and generated tokens (as transformers' and vLLM's); presence and
        frequency only the generated ones (as OpenAI's)."""
        if self.logit_bias:
            ids = torch.tensor([t for t, _ in self.logit_bias], device=logits.device)
            logits[ids] += torch.tensor([b for _, b in self.logit_bias], dtype=logits.dtype,
                                        device=logits.device)
        if self.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*self.prompt_ids, *self.generated_ids}),
                                dtype=torch.int64, device=logits.device)
            if seen.numel():
                values = logits[seen]
                logits[seen] = torch.where(values > 0, values / self.repetition_penalty,
                                           values * self.repetition_penalty)
        if (self.presence_penalty or self.frequency_penalty) and self.generated_ids:
            counts = torch.bincount(
                torch.tensor(list(self.generated_ids), dtype=torch.int64, device=logits.device),
                minlength=logits.size(-1))[: logits.size(-1)].to(logits.dtype)
            logits -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0)


class _Sampler(ContinuousBatchingLogitsProcessor):
    """The engine's only logits processor: picks each row's token and leaves only that one.

    A row's logit_bias and penalties adjust its logits first (`_RowSampling.adjust`), then a
    greedy row takes the argmax. A sampled row is scaled by its temperature, filtered by its
    top_k and top_p (as transformers' warpers do, in that order), takes Gumbel noise keyed by
    (seed, position), and the argmax of the sum: exactly a draw from the softmax, the same for
    the same seed and logits whatever the batch. Work is only what a row asks for (no sort
    unless top_p < 1), and transformers runs greedy (`do_sample=False`), so its own softmax and
    multinomial draw over the vocabulary are skipped. The chosen token is left as the only
    finite logit. A guided row (structured output) first loses every token its grammar does not
    allow next, and its grammar then consumes the token chosen (`guided_decoding`).

    Rows are read in `prepare_tensor_args` and used by the next `__call__`: the engine batches
    synchronously (`use_async_batching=False`, no CUDA graphs), so the two alternate.
    """

    supported_kwargs: ClassVar[dict[str, type]] = {
        "temperature": float, "top_k": int, "top_p": float, "choice_seed": int, "min_tokens": int,
        "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
        "logit_bias": tuple, "top_logprobs": int, "position_offset": int,
        "guide": int,  # a key of `guides`
    }
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, eos_token_ids: Sequence[int]):
        self._eos = list(eos_token_ids)
        self._rows: list[_RowSampling] = []
        # request id → its chosen tokens' log probabilities, in order, until the engine takes
        # them (from its own thread: hence the lock). Only a live request's (`track` to
        # `forget`): the generation thread may run one more step of a request just cancelled or
        # cut by a stop string, and what it records then would stay forever.
        self._logprobs: dict[str, list[TokenLogprob]] = {}
        self._logprobs_lock = threading.Lock()
        # Guided requests' grammars by key, set by the engine before a request is added and
        # dropped when it ends; read here on the generation thread.
        self.guides: dict[int, Guide] = {}
        # request id → why its grammar failed, until the engine takes it (under the same lock).
        self._guide_failures: dict[str, str] = {}

    def take_logprobs(self, request_id: str, count: int) -> tuple[TokenLogprob, ...]:
        """The first `count` recorded log probabilities of `request_id` not taken yet (the
        sampler may already have chosen a token its output does not carry yet)."""
        with self._logprobs_lock:
            recorded = self._logprobs.get(request_id)
            if not recorded or count <= 0:
                return ()
            taken, self._logprobs[request_id] = recorded[:count], recorded[count:]
            return tuple(taken)

    def take_guide_failure(self, request_id: str) -> str:
        """Why `request_id`'s grammar failed (its matcher's error), once; "" when it did not."""
        with self._logprobs_lock:
            return self._guide_failures.pop(request_id, "")

    def track(self, request_id: str) -> None:
        """Records `request_id`'s log probabilities (if it asks for them) until `forget`."""
        with self._logprobs_lock:
            self._logprobs[request_id] = []

    def forget(self, request_id: str) -> None:
        with self._logprobs_lock:
            self._logprobs.pop(request_id, None)
            self._guide_failures.pop(request_id, None)

    def forget_all(self) -> None:
        with self._logprobs_lock:
            self._logprobs.clear()
            self._guide_failures.clear()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        rows = []
        for request in requests_with_new_token:
            state = request.state
            kwargs = state.logit_processor_kwargs
            # A continuation's tokens count from the original's start: the same (seed, position)
            continued = kwargs.get("position_offset", 0)
            position = state.generated_len() + continued
            seed = kwargs.get("choice_seed", 0)
            prompt_ids, generated_ids = _history(state, continued)
            guide = self.guides.get(kwargs.get("guide", 0))
            rows.append(_RowSampling(
                temperature=kwargs.get("temperature", 0.0),
                top_k=kwargs.get("top_k", 0), top_p=kwargs.get("top_p", 1.0),
                noise_key=noise_key(seed, position) if seed else 0,
                ban_eos=guide is None and position < kwargs.get("min_tokens", 0),
                guide=guide,
                repetition_penalty=kwargs.get("repetition_penalty", 1.0),
                presence_penalty=kwargs.get("presence_penalty", 0.0),
                frequency_penalty=kwargs.get("frequency_penalty", 0.0),
                logit_bias=kwargs.get("logit_bias", ()),
                prompt_ids=prompt_ids, generated_ids=generated_ids,
                request_id=state.request_id,
                top_logprobs=kwargs.get("top_logprobs", LOGPROBS_OFF),
            ))  # fmt: skip
        self._rows = rows
        return torch.zeros(len(rows), dtype=torch.int32)  # the rows are kept above

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if len(rows) != scores.size(0):
            raise RuntimeError(f"{scores.size(0)} rows of logits for {len(rows)} prepared rows")
        raw = scores  # the model's own distribution, for log probabilities
        adjusted = [i for i, row in enumerate(rows) if row.adjusts_logits]
        guided = [(i, row.guide) for i, row in enumerate(rows) if row.guide is not None]
        if adjusted or guided:
            scores = scores.clone()
        for i in adjusted:
            rows[i].adjust(scores[i])
        for i, guide in guided:  # after logit_bias: no bias lets a row leave its grammar
            allowed = guide.allowed(scores.size(1)).to(scores.device)
            scores[i].masked_fill_(~allowed, -torch.inf)
        chosen = torch.empty(len(rows), dtype=torch.int64, device=scores.device)
        greedy = [i for i, row in enumerate(rows) if not row.temperature]
        if greedy:
            logits = scores[greedy]  # a copy
            banned = [j for j, i in enumerate(greedy) if rows[i].ban_eos]
            if banned:
                logits[torch.tensor(banned)[:, None], torch.tensor(self._eos)[None, :]] = -torch.inf
            chosen[greedy] = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.temperature:
                chosen[i] = self._draw(scores[i], row)
        self._record_logprobs(raw, rows, chosen)
        for i, guide in guided:
            guide.consume(int(chosen[i]))
            if guide.failed:  # its mask was empty: the row took a token its grammar refuses
                with self._logprobs_lock:
                    if rows[i].request_id in self._logprobs:  # live (`track`), as below
                        self._guide_failures[rows[i].request_id] = guide.failed
                chosen[i] = self._eos[0]  # ends the row now; the engine reports why
        only = torch.full_like(scores, -torch.inf)
        return only.scatter_(1, chosen.unsqueeze(1), 0.0)

    def _record_logprobs(self, raw: torch.Tensor, rows: list[_RowSampling],
                         chosen: torch.Tensor) -> None:
        """The chosen tokens' log probabilities (and the top ones') of the rows that ask."""
        asking = [i for i, row in enumerate(rows) if row.top_logprobs != LOGPROBS_OFF]
        if not asking:
            return
        logprobs = torch.log_softmax(raw[asking].float(), dim=-1)
        picked = chosen[asking]
        chosen_lp = logprobs.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
        most = max(rows[i].top_logprobs for i in asking)
        top_lp, top_ids = (torch.topk(logprobs, most, dim=-1) if most
                           else (logprobs[:, :0], picked[:0].unsqueeze(0)))
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        ids = picked.tolist()
        with self._logprobs_lock:
            for j, i in enumerate(asking):
                recorded = self._logprobs.get(rows[i].request_id)
                if recorded is None:  # ended (cancelled, stopped): nothing will take them
                    continue
                k = rows[i].top_logprobs
                top = tuple(zip(top_ids[j][:k], top_lp[j][:k], strict=True)) if k else ()
                recorded.append(TokenLogprob(ids[j], chosen_lp[j], top))

    def _draw(self, logits: torch.Tensor, row: _RowSampling) -> torch.Tensor:
        """One sampled row's token (float32 arithmetic as transformers' per-request warpers).

        EOS is banned below `min_tokens` before top-k and top-p choose (transformers' order), so
        they choose among the tokens the row may draw: banned after, a set holding only EOS
        would leave nothing, and the draw would take token 0."""
        logits = logits / torch.tensor(row.temperature, dtype=torch.float32)
        if row.ban_eos:
            logits[self._eos] = -torch.inf
        vocab = logits.size(-1)
        if 0 < row.top_k < vocab:
            threshold = torch.topk(logits, row.top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, -torch.inf)
        if row.top_p < 1.0:
            ascending, order = torch.sort(logits)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - torch.tensor(row.top_p, dtype=torch.float32)
            drop[-1] = False  # the most likely token always stays
            logits = logits.masked_fill(drop.scatter(0, order, drop), -torch.inf)
        generator = torch.Generator(device=logits.device).manual_seed(row.noise_key)
        uniform = torch.rand(vocab, generator=generator, device=logits.device)
        return torch.argmax(logits - torch.log(-torch.log(uniform.clamp_(1e-20, 1.0))))


def _history(state, continued: int = 0) -> tuple[Sequence[int], Sequence[int]]:
    """A request's prompt and generated ids; a preempted request was re-queued with its generated
    tokens appended to its prompt (transformers' `_true_initial_tokens` marks where), and a
    continuation's last `continued` prompt ids are the original's generated ones (the penalties
    see them as generated, as the original did)."""
    true_prompt = getattr(state, "_true_initial_tokens", 0)
    if true_prompt:
        prompt = state.initial_tokens[:true_prompt]
        generated = [*state.initial_tokens[true_prompt:], *state.generated_tokens]
    else:
        prompt = getattr(state, "initial_tokens", ())
        generated = getattr(state, "generated_tokens", ())
    if continued:
        return prompt[:len(prompt) - continued], [*prompt[len(prompt) - continued:], *generated]
    return prompt, generated


@dataclass
class _Request:
    """What the engine keeps for one unfinished request."""

    generation: Generation
    num_input_tokens: int
    detokenizer: IncrementalDetokenizer
    num_output_tokens: int = 0  # new tokens (a continuation's continued ones not counted)
    logprobs_taken: int = 0  # tokens whose log probabilities went out with a delta
    guide_key: int = 0  # its key in the sampler's guides (0: not guided)


class _SaltedChains:
    """Gives transformers' paged cache vLLM's `cache_salt`: a salted request's block-hash chain
    starts from its salt's root (`kv_blocks.chain_root`) instead of from nothing, so it matches
    and registers only blocks of requests with the same salt, and the hashes the cache holds are
    the ones the gateway computes with that salt. transformers has no such hook: the two
    methods that start a chain (`match_prefix_blocks`, `mark_complete_blocks`) are replaced on
    this cache's allocators by the same loops with a root; an unsalted request runs
    transformers' own. Runs on the generation thread; `roots` is written by the caller's.
    """

    PRUNE_EVERY_S = 1.0

    def __init__(self, cache, is_live: Callable[[str], bool]):
        self.roots: dict[str, int] = {}  # request id -> its chain's root (salted requests only)
        self._is_live = is_live
        self._gone: set[str] = set()  # requests not live at the last pruning
        self._pruned_at = time.monotonic()
        self._matching: int | None = None  # the root of the request `search_prefix_match` serves
        search = cache.search_prefix_match

        def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:
            self._matching = self.roots.get(request_id)
            try:
                return search(request_id, prompt_ids)
            finally:
                self._matching = None

        cache.search_prefix_match = search_prefix_match
        for allocator in cache.cache_allocators.values():
            allocator.match_prefix_blocks = self._matcher(allocator)
            allocator.mark_complete_blocks = self._marker(allocator)

    def add(self, request_id: str, cache_salt: str) -> None:
        """Before the request reaches transformers. Forgets the roots of requests gone from it
        for a whole pruning period (`is_live` cannot see one in transit between transformers'
        queues, and a root dropped too soon would hash its blocks unsalted)."""
        now = time.monotonic()
        if now - self._pruned_at >= self.PRUNE_EVERY_S:
            gone = {r for r in self.roots if not self._is_live(r)}
            self.roots = {r: root for r, root in self.roots.items()
                          if r not in gone or r not in self._gone}
            self._gone, self._pruned_at = gone, now
        root = chain_root(cache_salt)
        if root is None:
            self.roots.pop(request_id, None)  # never another request's salt under a reused id
        else:
            self.roots[request_id] = root

    def _matcher(self, allocator) -> Callable[[list[int]], list[int]]:
        original = allocator.match_prefix_blocks

        def match_prefix_blocks(prompt_ids: list[int]) -> list[int]:
            root = self._matching
            if root is None:
                return original(prompt_ids)
            page, hash_to_block = allocator.tokens_per_page, allocator.ledger.hash_to_block
            matched: list[int] = []
            for index in range((len(prompt_ids) - 1) // page):
                root = block_hash(root, prompt_ids[index * page:(index + 1) * page])
                block_id = hash_to_block.get(root)
                if block_id is None:
                    break
                matched.append(block_id)
            return matched

        return match_prefix_blocks

    def _marker(self, allocator) -> Callable[[str, list[int], int], None]:
        original = allocator.mark_complete_blocks

        def mark_complete_blocks(request_id: str, token_ids: list[int], new_blocks: int) -> None:
            parent = self.roots.get(request_id)
            if parent is None:
                original(request_id, token_ids, new_blocks)
                return
            page, ledger = allocator.tokens_per_page, allocator.ledger
            block_table = allocator.block_table[request_id]
            for index, block_id in enumerate(block_table):
                hashed = ledger.block_to_hash.get(block_id)
                if hashed is None:
                    tokens = token_ids[index * page:(index + 1) * page]
                    if new_blocks == 0 or len(tokens) < page:
                        break
                    hashed = block_hash(parent, tokens)
                    new_blocks -= 1
                    identical = ledger.register_new_hash(block_id, hashed)
                    if identical is not None:  # the same salt's block: adopt it, free ours
                        ledger.acquire(identical)
                        block_table[index] = identical
                        if ledger.release(block_id):
                            allocator.pool.free_blocks(allocator.index, [block_id])
                parent = hashed

        return mark_complete_blocks


class TorchEngine:
    """One model instance: weights, tokenizer, a continuous-batching manager and its KV cache."""

    def __init__(
        self, model_dir: pathlib.Path, tokenizer_dir: pathlib.Path, config: TorchEngineConfig
    ):
        """Loads the model (transformers' format: a GGUF's converted copy, or a Hugging Face
        model's own files) in `config.resolved_dtype`, and its tokenizer; the generation thread
        starts with `start()`."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.config = config
        if config.threads and config.resolved_device == "cpu":
            torch.set_num_threads(config.threads)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=DTYPES[config.resolved_dtype])
        model.to(config.resolved_device)
        eos = model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        if not eos_ids or not all(isinstance(token, int) for token in eos_ids):
            raise ValueError(f"the model states no end-of-sequence token id ({eos_ids!r}): "
                             "it could never stop, nor end a guided row")
        self._model, self._tokenizer = model, tokenizer
        self.context_window = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        # Greedy for transformers: _Sampler, the only logits processor, has chosen each token.
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=16, eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config,
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=config.num_blocks,
                page_size=config.page_size,
                max_batch_tokens=config.max_batch_tokens,
                per_request_processors=True,
                use_async_batching=False,
                use_cuda_graph=False,
                max_queue_size=0,
            ),
        )
        processors = self._manager.logit_processor
        self._sampler = _Sampler(eos_ids)
        self._guide_keys = itertools.count(1)
        self._guides = GuideCompiler(tokenizer, int(model.config.vocab_size), eos_ids)
        processors.logits_processor.append(self._sampler)
        processors.tensors_required += 1
        processors.supported_keys.update(_Sampler.supported_kwargs)
        processors.do_processing = True
        self._requests: dict[str, _Request] = {}
        self._published_blocks: set[int] | None = None  # what kv_events() said last (None: never)
        self._salted: _SaltedChains | None = None  # from start(): the cache exists then

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts the generation thread; returns once its KV cache exists."""
        self._manager.start()
        deadline = time.monotonic() + timeout_s
        while self._manager.batch_processor is None:
            if not self._manager.is_running() or time.monotonic() > deadline:
                raise RuntimeError("the continuous-batching thread did not start")
            time.sleep(0.01)
        self._salted = _SaltedChains(self._manager.batch_processor.cache, self._in_transformers)

    def _in_transformers(self, request_id: str) -> bool:
        """Whether transformers may still hash the request's blocks (ours, or queued or running
        there)."""
        scheduler = self._manager.batch_processor.scheduler
        return (request_id in self._requests or request_id in scheduler.active_requests
                or request_id in scheduler.waiting_requests)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the generation thread; unfinished requests are dropped (the caller fails them)."""
        for request_id in list(self._requests):
            self._manager.cancel_request(request_id)
        self._requests.clear()
        self._sampler.guides.clear()
        self._manager.stop(block=True, timeout=timeout_s)

    # -- requests ------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def compile_guide(self, guide_type: str, guide: str) -> Guide:
        """The grammar for `Generation.guide` (TensorRT-LLM's `guided_decoding_guide_type` and
        `guided_decoding_guide`); ValueError names what cannot be compiled. Compiled guides are
        cached (bounded LRU). Called by one thread, never the generation thread."""
        return self._guides.guide(guide_type, guide)

    def submit(self, generation: Generation) -> int:
        """Queues a request; returns its prompt token count. ValueError names what cannot run."""
        if self._salted is None:
            raise RuntimeError("the engine is not started")
        if generation.request_id in self._requests:
            raise ValueError(f"request {generation.request_id} is already in the engine")
        prompt_ids = self._encode(generation.prompt)
        if not prompt_ids:
            raise ValueError("text_input holds no tokens")
        vocabulary = int(self._model.config.vocab_size)
        if any(not 0 <= token < vocabulary for token in generation.continued):
            raise ValueError(f"continue_ids must be token ids below {vocabulary}")
        prompt_ids += generation.continued
        if len(prompt_ids) + generation.max_tokens > self.context_window:
            raise ValueError(
                f"{len(prompt_ids)} prompt tokens + max_tokens {generation.max_tokens} exceed the "
                f"context window of {self.context_window}"
            )
        sampling = generation.sampling
        outside = [t for t, _ in sampling.logit_bias if t >= self.vocab_size]
        if outside:
            raise ValueError(f"logit_bias token id {outside[0]} is not in the vocabulary of "
                             f"{self.vocab_size} tokens")
        greedy = sampling.temperature == 0.0
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        detokenizer = IncrementalDetokenizer(self._decode, generation.stop)
        if generation.continued:  # the text the original already sent (or held back)
            detokenizer.push_each(generation.continued, 0)
            if detokenizer.stopped:
                raise ValueError("continue_ids already end in a stop string")
        guide_key = 0
        if generation.guide is not None:
            for token in generation.continued:  # a continuation: the grammar where it was
                generation.guide.consume(token)
            if generation.guide.failed:
                raise ValueError("continue_ids do not follow guided_decoding_guide")
            guide_key = next(self._guide_keys)
            self._sampler.guides[guide_key] = generation.guide
        self._salted.add(generation.request_id, generation.cache_salt)
        self._requests[generation.request_id] = _Request(
            generation, len(prompt_ids), detokenizer, guide_key=guide_key)
        self._sampler.track(generation.request_id)
        try:
            self._add_request(generation, prompt_ids, sampling, greedy, seed, guide_key)
        except BaseException:
            self._forget(generation.request_id)  # nothing of a request transformers refused
            raise
        return len(prompt_ids)

    def _add_request(self, generation: Generation, prompt_ids: list[int], sampling: Sampling,
                     greedy: bool, seed: int, guide_key: int) -> None:
        self._manager.add_request(
            prompt_ids,
            request_id=generation.request_id,
            max_new_tokens=generation.max_tokens,
            streaming=True,
            temperature=float(sampling.temperature),  # 0.0: greedy
            top_k=int(sampling.top_k),
            top_p=float(sampling.top_p),
            choice_seed=0 if greedy else (seed % (2**62)) + 1,
            min_tokens=int(sampling.min_tokens),
            repetition_penalty=float(sampling.repetition_penalty),
            presence_penalty=float(sampling.presence_penalty),
            frequency_penalty=float(sampling.frequency_penalty),
            logit_bias=tuple((int(t), float(b)) for t, b in sampling.logit_bias),
            top_logprobs=int(sampling.top_logprobs),
            guide=guide_key,
            position_offset=len(generation.continued),
        )

    def cancel(self, request_id: str) -> bool:
        """Drops a request; its KV blocks are freed on the generation thread's next step."""
        if self._forget(request_id) is None:
            return False
        self._manager.cancel_request(request_id)
        return True

    def poll(self, timeout_s: float) -> list[Delta]:
        """Waits up to `timeout_s` for decoded tokens; returns every delta available now."""
        deltas: list[Delta] = []
        output = self._manager.get_result(timeout=timeout_s)
        while output is not None:
            delta = self._delta(output)
            if delta is not None:
                deltas.append(delta)
            output = self._manager.get_result(timeout=0)
        if not self._manager.is_running() and self._requests:
            deltas.extend(self._fail_all("the generation thread stopped"))
        return deltas

    def _delta(self, output) -> Delta | None:
        request = self._requests.get(output.request_id)
        if request is None:
            return None  # cancelled, or already ended by a stop string: its leftovers are moot
        generated = list(output.generated_tokens)
        new_ids = tuple(generated[request.num_output_tokens:])
        first = request.num_output_tokens == 0 and len(generated) > 0
        pushed = len(request.generation.continued) + request.num_output_tokens
        request.num_output_tokens = count = len(generated)
        tokens = [*request.generation.continued, *generated]  # the detokenizer's whole text
        logprobs = self._new_logprobs(request, count)
        if failure := self._sampler.take_guide_failure(output.request_id):
            # The grammar allowed no token of this vocabulary: the schema's fault (one that
            # compiles but cannot be met), so a refusal, as one found when it was compiled.
            if not output.is_finished():
                self._manager.cancel_request(output.request_id)
            self._forget(output.request_id)
            return Delta(output.request_id, "", request.num_input_tokens, count, first,
                         FinishReason.ERROR, f"guided_decoding_guide allows no token after "
                         f"{count - 1} output tokens: {failure[:300]}", token_ids=new_ids,
                         refused=True)
        if output.status == RequestStatus.FAILED:
            self._forget(output.request_id)
            return Delta(output.request_id, "", request.num_input_tokens, count, first,
                         FinishReason.ERROR, output.error or "the engine failed the request",
                         token_ids=new_ids)
        if output.is_finished():
            self._forget(output.request_id)
            text = request.detokenizer.finish(tokens)
            reason = FinishReason.LENGTH
            if request.detokenizer.stopped or count < request.generation.max_tokens:
                reason = FinishReason.STOP
            return Delta(output.request_id, text, request.num_input_tokens, count, first,
                         reason, logprobs=logprobs, token_ids=new_ids)
        text = request.detokenizer.push_each(tokens, pushed)
        if request.detokenizer.stopped:  # a stop string: end it here and free its blocks
            self.cancel(output.request_id)
            return Delta(output.request_id, text, request.num_input_tokens, count, first,
                         FinishReason.STOP, logprobs=logprobs, token_ids=new_ids)
        return Delta(output.request_id, text, request.num_input_tokens, count, first,
                     logprobs=logprobs, token_ids=new_ids)

    def _new_logprobs(self, request: _Request, tokens: int) -> tuple[TokenLogprob, ...]:
        if request.generation.sampling.top_logprobs == LOGPROBS_OFF:
            return ()
        taken = self._sampler.take_logprobs(request.generation.request_id,
                                            tokens - request.logprobs_taken)
        request.logprobs_taken += len(taken)
        return taken

    def token_text(self, token_id: int) -> str:
        """One token's own text as the output shows it (a special token such as EOS is empty);
        the dispatcher thread's: it owns the tokenizer."""
        return self._decode([token_id])

    def _forget(self, request_id: str) -> _Request | None:
        """Drops a request, its log probabilities and its grammar from the engine's books."""
        request = self._requests.pop(request_id, None)
        self._sampler.forget(request_id)
        if request is not None and request.guide_key:
            self._sampler.guides.pop(request.guide_key, None)
        return request

    def _fail_all(self, message: str) -> list[Delta]:
        failed = [
            Delta(rid, "", r.num_input_tokens, r.num_output_tokens, False, FinishReason.ERROR,
                  message)
            for rid, r in self._requests.items()
        ]
        self._requests.clear()
        self._sampler.guides.clear()
        self._sampler.forget_all()
        return failed

    # -- state ---------------------------------------------------------------------------------

    def kv_events(self) -> list[KvEvent]:
        """What the prefix cache can find now, as events against what the last call said (the
        first starts with `AllBlocksCleared`): the cache's own block hashes (the ones
        `services.common.kv_blocks` computes), read from transformers' ledgers.

        Read, not hooked: a block stored and evicted between two calls is never mentioned,
        which changes nothing a reader can see. Each new block's parent is read from the block
        table of a request holding it; one whose request already finished says no parent. A
        cache that does not share prefixes (`use_prefix_sharing` off) holds nothing findable.
        """
        processor = self._manager.batch_processor
        if processor is None:
            raise RuntimeError("the engine is not started")
        cache = processor.cache
        allocators = list(cache.cache_allocators.values())
        held: set[int] = set()
        if cache.use_prefix_sharing and allocators:
            # A block is found only if every layer group has it (one group for most models).
            held = set.intersection(*(set(a.ledger.hash_to_block) for a in allocators))
        events: list[KvEvent] = []
        previous = self._published_blocks
        if previous is None:
            events.append(AllBlocksCleared())
            previous = set()
        gone = previous - held
        if gone:
            events.append(BlockRemoved(tuple(gone)))
        new = held - previous
        if new:
            events.extend(self._stores(allocators[0], new))
        self._published_blocks = held
        return events

    def _stores(self, allocator, new: set[int]) -> list[BlockStored]:
        """`new` as one store per chain run, parents from the block tables that hold them."""
        page = self.config.page_size
        block_to_hash = allocator.ledger.block_to_hash
        stores: list[BlockStored] = []
        left = set(new)
        for blocks in list(allocator.block_table.values()):
            parent = None
            run: list[int] = []
            run_parent = None
            for block in list(blocks):
                block_hash = block_to_hash.get(block)
                if block_hash is None:
                    break
                if block_hash in left:
                    if not run:
                        run_parent = parent
                    run.append(block_hash)
                    left.discard(block_hash)
                elif run:
                    stores.append(BlockStored(tuple(run), run_parent, page))
                    run = []
                parent = block_hash
            if run:
                stores.append(BlockStored(tuple(run), run_parent, page))
        stores.extend(BlockStored((block_hash,), None, page) for block_hash in left)
        return stores

    def stats(self) -> EngineStats:
        """The cache's and the scheduler's state now (reads transformers' private attributes)."""
        processor = self._manager.batch_processor
        if processor is None:
            raise RuntimeError("the engine is not started")
        cache, scheduler = processor.cache, processor.scheduler
        used: set[tuple[int, int]] = set()
        reused = 0
        for allocator in cache.cache_allocators.values():
            for blocks in list(allocator.block_table.values()):
                used.update((allocator.index, b) for b in list(blocks))
            reused += len(allocator.ledger.cached_blocks)
        kv_max = int(cache.num_blocks)
        active = list(scheduler.active_requests.values())
        prefilling = sum(1 for s in active if s.status == RequestStatus.PREFILLING)
        return EngineStats(
            active=len(active),
            max=min(kv_max, self.config.max_batch_tokens),
            waiting=len(scheduler.waiting_requests),
            scheduled=len(active),
            context=prefilling,
            kv_max=kv_max,
            kv_used=len(used),
            kv_free=kv_max - len(used),
            kv_reused=reused,
            kv_tokens_per=self.config.page_size,
        )
