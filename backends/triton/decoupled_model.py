"""What every decoupled Python-backend model with TensorRT-LLM's tensor interface shares.

The reference engine's and the torch engine's `model.py` both parse the `ensemble` inputs, send
`text_output` with the token counts, end each request with exactly one response carrying the
final flag, and export TensorRT-LLM's metric names. Imported only inside Triton's Python-backend
stub, where `triton_python_backend_utils` exists.
"""

from __future__ import annotations

import faulthandler
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import triton_python_backend_utils as pb_utils

__all__ = ["FINAL", "LOGPROB_OUTPUTS", "PROBE_INPUT", "EngineMetrics", "Inbox", "Pending",
           "SentLogprob", "enqueue",
           "logit_bias", "model_parameters", "parse_text_request", "refused", "report_crashes",
           "response", "scalar", "send", "send_error", "stopped", "strings", "token_ids"]

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
REQUEST_TYPES = ("active", "max", "waiting", "scheduled", "context")
KV_CACHE_TYPES = ("max", "free", "used", "tokens_per", "reused", "fraction")
# A request with this input true is a liveness probe (the sidecar's): `execute()` answers it at
# once with an empty final response, without the engine. Mirrored in backends/triton/adapter.py.
PROBE_INPUT = "infermesh_probe"
# How a model says its engine no longer runs (its dispatcher ended: a shutdown, or a bug), on a
# refused request and on a probe: the gateway and the sidecar take it for the replica's failure,
# not the request's. Mirrored in backends/triton/adapter.py.
ENGINE_STOPPED = "engine stopped"


# How a model refuses a request it cannot run (a ValueError from parsing it or from its engine:
# a prompt the KV cache or the context window can never hold): the gateway answers the client
# INVALID_ARGUMENT with the reason, never INTERNAL. Mirrored in backends/triton/adapter.py.
REQUEST_REFUSED = "request refused: "


def stopped(engine: str) -> str:
    return f"{ENGINE_STOPPED} ({engine})"


def refused(error: ValueError) -> str:
    return f"{REQUEST_REFUSED}{error}"


@dataclass
class Pending:
    """A request the dispatcher owns from enqueue until its final response (then it is dropped)."""

    request: pb_utils.InferenceRequest  # kept for is_cancelled(); never used after the final flag
    sender: pb_utils.InferenceResponseSender
    stream: bool
    prefix: str  # prepended to a non-streamed text: the prompt, unless exclude_input_in_output
    outputs: frozenset[str]  # the outputs the client asked for: the only ones ever built
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    pieces: list[str] = field(default_factory=list)  # the text so far, when not streaming
    first_token_time_ns: int = 0  # wall clock, comparable with the gateway's own timestamps
    kv_cache_reused_blocks: int = 0  # prompt blocks found in the prefix cache (0: not known)
    # Ids of the tokens generated since the last response, sent with the next one (`output_ids`):
    # a response's ids are those whose text it carries or the engine still holds back, so the
    # ids a client has received always continue exactly where its text left off.
    token_ids: list[int] = field(default_factory=list)
    # Log probabilities asked for (`return_log_probs`): the top ones per token (0: the chosen
    # token's only; -1: none asked), and those not sent yet, in token order.
    top_logprobs: int = -1
    logprobs: list[SentLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class SentLogprob:
    """One generated token as the engine's tokenizer spells it, its log probability, and the
    most likely tokens' at that step (exactly `Pending.top_logprobs` of them)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


# The outputs that carry log probabilities, per response for the tokens it adds: TensorRT-LLM's
# `output_log_probs`, and beside it what the gateway shows (each token's bytes, the top ones'),
# flattened token by token (`top_*` hold `Pending.top_logprobs` entries per token).
LOGPROB_OUTPUTS = ("output_log_probs", "output_tokens", "top_log_probs", "top_log_prob_tokens")


def requested_logprobs(request: pb_utils.InferenceRequest) -> int:
    """-1 unless `return_log_probs`; then `num_top_log_probs` (0..20)."""
    if not scalar(request, "return_log_probs", False):
        return -1
    top = int(scalar(request, "num_top_log_probs", 0))
    if not 0 <= top <= 20:
        raise ValueError(f"top_logprobs (num_top_log_probs) must be in [0, 20], got {top}")
    return top


def report_crashes() -> None:
    """A fatal signal in the stub (a segfault in an extension) ends the model instance for good;
    this leaves the Python stack of every thread in Triton's log (the stub's stderr) first."""
    faulthandler.enable(all_threads=True)


def model_parameters(args: dict[str, str]) -> dict[str, str]:
    """config.pbtxt's `parameters`, as plain strings."""
    parameters = json.loads(args["model_config"]).get("parameters", {})
    return {key: value["string_value"] for key, value in parameters.items()}


def scalar(request: pb_utils.InferenceRequest, name: str, default: Any) -> Any:
    """An optional [1, 1] input's value; one sequence per request, as the engines generate."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"{name} must hold one value per request, got shape {list(array.shape)}")
    return array.item()


def strings(request: pb_utils.InferenceRequest, name: str) -> tuple[str, ...]:
    """A `dims: [-1]` string input (stop_words, bad_words), empty entries dropped."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ()
    return tuple(s for s in (v.decode() for v in tensor.as_numpy().reshape(-1)) if s)


def logit_bias(request: pb_utils.InferenceRequest) -> tuple[tuple[int, float], ...]:
    """`logit_bias_token_ids` (INT32) and `logit_bias_values` (FP32), `dims: [-1]` each, as
    (token id, bias) pairs; ValueError when they do not pair up."""
    ids = pb_utils.get_input_tensor_by_name(request, "logit_bias_token_ids")
    values = pb_utils.get_input_tensor_by_name(request, "logit_bias_values")
    if ids is None and values is None:
        return ()
    if ids is None or values is None:
        raise ValueError("logit_bias needs both logit_bias_token_ids and logit_bias_values")
    id_list = [int(v) for v in ids.as_numpy().reshape(-1)]
    value_list = [float(v) for v in values.as_numpy().reshape(-1)]
    if len(id_list) != len(value_list):
        raise ValueError("logit_bias_token_ids and logit_bias_values differ in length")
    return tuple(zip(id_list, value_list, strict=True))


def guided_decoding(request: pb_utils.InferenceRequest) -> tuple[str, str] | None:
    """TensorRT-LLM's `guided_decoding_guide_type` and `guided_decoding_guide`, when the request
    asks for structured output; ValueError when the guide comes without its type."""
    guide_type = scalar(request, "guided_decoding_guide_type", b"").decode()
    guide = scalar(request, "guided_decoding_guide", b"").decode()
    if not guide_type:
        if guide:
            raise ValueError("guided_decoding_guide needs guided_decoding_guide_type")
        return None
    return guide_type, guide


def token_ids(request: pb_utils.InferenceRequest, name: str) -> tuple[int, ...]:
    """A `dims: [-1]` INT32 input of token ids (`continue_ids`); empty when not given."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ()
    return tuple(int(token) for token in tensor.as_numpy().reshape(-1))


def parse_text_request(
    request: pb_utils.InferenceRequest, sender: pb_utils.InferenceResponseSender
) -> tuple[str, int, Pending]:
    """(prompt, max_tokens, the request's Pending) from the inputs every engine reads; ValueError
    names what is wrong."""
    raw_prompt = scalar(request, "text_input", None)
    if raw_prompt is None:
        raise ValueError("text_input is required")
    max_tokens = scalar(request, "max_tokens", None)
    if max_tokens is None:
        raise ValueError("max_tokens is required")
    prompt = raw_prompt.decode()
    stream = bool(scalar(request, "stream", False))
    exclude_input = bool(scalar(request, "exclude_input_in_output", False))
    # As TensorRT-LLM: a non-streamed text repeats the prompt unless told not to.
    pending = Pending(request=request, sender=sender, stream=stream,
                      prefix="" if stream or exclude_input else prompt,
                      outputs=frozenset(request.requested_output_names()),
                      top_logprobs=requested_logprobs(request))
    return prompt, int(max_tokens), pending


def response(pending: Pending, text: str) -> pb_utils.InferenceResponse:
    """Only the outputs the client asked for. Triton 2.51's stub drops the others itself, freeing
    their numpy arrays without holding the GIL, which corrupts the interpreter's heap and
    crashes the stub under load (python_backend #390, fixed after 24.10)."""
    # Batched model: every output carries the batch dimension, shape [1, 1].
    tensors = []
    if "text_output" in pending.outputs:
        tensors.append(pb_utils.Tensor(
            "text_output", np.array([[text.encode()]], dtype=np.object_)))
    if "output_ids" in pending.outputs:
        tensors.append(pb_utils.Tensor(
            "output_ids", np.array([pending.token_ids], dtype=np.int32).reshape(1, -1)))
    for name, value, dtype in (
        ("num_input_tokens", pending.num_input_tokens, np.int32),
        ("num_output_tokens", pending.num_output_tokens, np.int32),
        ("first_token_time_ns", pending.first_token_time_ns, np.int64),
        ("kv_cache_reused_blocks", pending.kv_cache_reused_blocks, np.int32),
    ):
        if name in pending.outputs:
            tensors.append(pb_utils.Tensor(name, np.array([[value]], dtype)))
    if pending.top_logprobs >= 0:
        tensors.extend(_logprob_tensors(pending))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _logprob_tensors(pending: Pending) -> list[pb_utils.Tensor]:
    sent = pending.logprobs
    columns = {
        "output_log_probs": np.array([[s.logprob for s in sent]], dtype=np.float32),
        "output_tokens": np.array([[s.token for s in sent]], dtype=np.object_),
        "top_log_probs": np.array([[lp for s in sent for _, lp in s.top]], dtype=np.float32),
        "top_log_prob_tokens": np.array([[t for s in sent for t, _ in s.top]],
                                        dtype=np.object_),
    }
    return [pb_utils.Tensor(name, columns[name]) for name in LOGPROB_OUTPUTS
            if name in pending.outputs]


def send_error(sender: pb_utils.InferenceResponseSender, message: str, engine: str) -> None:
    """An error response that is also the request's final one; a refusal is only logged."""
    error = pb_utils.TritonError(message)
    try:
        sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)
    except Exception as refused:  # nothing more can be done for this request
        pb_utils.Logger.log_error(f"{engine}: error response not sent: {refused!r}")


def send(pending: Pending, text: str, final: bool, engine: str) -> bool:
    """One response; False when the server refused it (then the request's state is unknown:
    the caller drops it for good and never touches it again)."""
    try:
        pending.sender.send(response(pending, text), flags=FINAL if final else 0)
        pending.logprobs.clear()
        pending.token_ids.clear()
        return True
    except Exception as error:
        pb_utils.Logger.log_error(f"{engine}: response not sent: {error!r}")
        return False


class Inbox:
    """Parsed requests handed from `execute()` to the dispatcher thread, until closed."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._items: list[Any] = []  # guarded by _condition
        self._closed = False  # guarded by _condition: no more requests are accepted

    @property
    def closed(self) -> bool:
        with self._condition:
            return self._closed

    def put(self, item: Any) -> bool:
        """Queues `item` and wakes the dispatcher; False once closed."""
        with self._condition:
            if self._closed:
                return False
            self._items.append(item)
            self._condition.notify()
            return True

    def take(self, wait: bool, timeout_s: float | None = None) -> list[Any] | None:
        """Everything queued; if `wait` and nothing is, waits up to `timeout_s` (None: until
        woken). None once closed."""
        with self._condition:
            if wait and not self._items and not self._closed:
                self._condition.wait(timeout_s)
            if self._closed:
                return None
            items, self._items = self._items, []
            return items

    def close(self) -> list[Any]:
        """Refuses further puts, wakes the dispatcher; returns what it never took."""
        with self._condition:
            self._closed = True
            items, self._items = self._items, []
            self._condition.notify_all()
            return items


def enqueue(
    requests: list[pb_utils.InferenceRequest],
    parse: Callable[[pb_utils.InferenceRequest, pb_utils.InferenceResponseSender], Any],
    inbox: Inbox, fail: Callable[[pb_utils.InferenceResponseSender, str], None], engine: str,
) -> None:
    """What `execute()` does: parse each request (ValueError names what is wrong) and queue it
    for the dispatcher; a request that cannot be queued gets its error as its final response."""
    for request in requests:
        sender = request.get_response_sender()
        try:
            if scalar(request, PROBE_INPUT, False):
                if inbox.closed:  # the process lives, the engine does not
                    fail(sender, stopped(engine))
                else:
                    _answer_probe(sender, engine)
                continue
            item = parse(request, sender)
        except ValueError as error:  # UnicodeDecodeError included
            fail(sender, refused(error))
            continue
        if not inbox.put(item):
            fail(sender, stopped(engine))


def _answer_probe(sender: pb_utils.InferenceResponseSender, engine: str) -> None:
    try:
        sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
    except Exception as refused:  # the prober gives up on its own deadline
        pb_utils.Logger.log_error(f"{engine}: probe answer not sent: {refused!r}")


class RequestStats(Protocol):
    """The counts `nv_trt_llm_request_metrics` carries, as each engine reports them."""

    active: int
    max: int
    waiting: int
    scheduled: int
    context: int


class KvCacheStats(RequestStats, Protocol):
    """And the block counts `nv_trt_llm_kv_cache_block_metrics` carries (engines with a cache)."""

    kv_max: int
    kv_free: int
    kv_used: int
    kv_tokens_per: int
    kv_reused: int

    @property
    def kv_fraction(self) -> float: ...


class EngineMetrics:
    """The engine's metrics on Triton's endpoint, named like TensorRT-LLM's."""

    def __init__(self, model: str, version: str, kv_cache: bool = False,
                 prefix_cache: bool = False):
        """`kv_cache`: also export `nv_trt_llm_kv_cache_block_metrics` (engines with a cache);
        `prefix_cache`: also count prefilled tokens by cache hit or miss (engines that know)."""
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        requests = pb_utils.MetricFamily(
            name="infermesh_engine_requests_total",
            description="Requests the engine finished, by outcome (completed, cancelled, error)",
            kind=counter,
        )
        tokens = pb_utils.MetricFamily(
            name="infermesh_engine_generated_tokens_total",
            description="Tokens the engine generated",
            kind=counter,
        )
        request_metrics = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics", description="TRT LLM request metrics", kind=gauge
        )
        self._families = [requests, tokens, request_metrics]
        self.outcomes = {
            outcome: requests.Metric(labels={"model": model, "outcome": outcome})
            for outcome in ("completed", "cancelled", "error")
        }
        self.generated_tokens = tokens.Metric(labels={"model": model})
        self._prefill_tokens: dict[str, Any] = {}  # cache (hit, miss) -> counter
        if prefix_cache:
            prefill = pb_utils.MetricFamily(
                name="infermesh_engine_prefill_tokens_total",
                description="Tokens the engine's prefills computed (cache=miss) or found in its "
                            "prefix cache (cache=hit)",
                kind=counter,
            )
            self._families.append(prefill)
            self._prefill_tokens = {cache: prefill.Metric(labels={"model": model, "cache": cache})
                                    for cache in ("hit", "miss")}
        base = {"model": model, "version": version}
        self._gauges = {
            ("request", kind): request_metrics.Metric(labels={**base, "request_type": kind})
            for kind in REQUEST_TYPES
        }
        if kv_cache:
            kv_metrics = pb_utils.MetricFamily(
                name="nv_trt_llm_kv_cache_block_metrics",
                description="TRT LLM KV cache block metrics",
                kind=gauge,
            )
            self._families.append(kv_metrics)
            self._gauges.update({
                ("kv", kind): kv_metrics.Metric(labels={**base, "kv_cache_block_type": kind})
                for kind in KV_CACHE_TYPES
            })  # fmt: skip
        self._published: dict[tuple[str, str], float] = {}

    def publish(self, stats: RequestStats | KvCacheStats) -> None:
        """Sets the gauges that changed (each set is a round trip to the server); the KV-cache
        ones from `stats.kv_<type>` when the metrics were made with `kv_cache`."""
        values = {("request", kind): getattr(stats, kind) for kind in REQUEST_TYPES}
        if ("kv", "max") in self._gauges:
            values.update({("kv", kind): getattr(stats, f"kv_{kind}") for kind in KV_CACHE_TYPES})
            values["kv", "fraction"] = round(values["kv", "fraction"], 4)
        for key, value in values.items():
            if self._published.get(key) != value:
                self._gauges[key].set(value)
                self._published[key] = value

    def count_prefill(self, computed: int, cached: int) -> None:
        """Adds one step's prefill tokens (needs `prefix_cache`)."""
        for cache, tokens in (("miss", computed), ("hit", cached)):
            if tokens:
                self._prefill_tokens[cache].increment(tokens)

    def close(self) -> None:
        # The stub insists that metrics die before their families.
        self.outcomes.clear()
        self._prefill_tokens.clear()
        self._gauges.clear()
        del self.generated_tokens
        self._families.clear()
