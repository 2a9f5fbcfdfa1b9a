"""Triton Python backend: the torch engine behind TensorRT-LLM's `ensemble` tensor interface.

`initialize()` materializes what the config names (the weights blob, verified against its digest,
then its converted copy; the tokenizer files, verified) and starts the engine's continuous
batching. Decoupled like TensorRT-LLM's inflight batcher: `execute()` only parses and enqueues;
one dispatcher thread owns the engine and the tokenizer, submits new requests, reads decoded
tokens, checks for cancelled requests and sends each request its text (every delta when
`stream` is true, else the whole text once). A request's last response carries the final flag;
after it the request and its sender are never touched again, because doing so crashes the whole
server (ENVIRONMENT.md, Trap 3).
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The stub takes its sys.path from the project's venv (see the reference model), so the engine
# and the weight cache are imported as package modules.
from backends.triton.torch_engine import (
    Delta,
    EngineStats,
    FinishReason,
    Generation,
    Sampling,
    TorchEngine,
    TorchEngineConfig,
)
from backends.triton.weights import materialize_files, materialize_weights
from services.registry.blobs import LocalBlobStore

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_REQUEST_TYPES = ("active", "max", "waiting", "scheduled", "context")
_KV_TYPES = ("max", "free", "used", "tokens_per", "reused", "fraction")
_POLL_S = 0.02  # longest a busy dispatcher waits for tokens before it looks at its inbox again
_CANCEL_CHECK_S = 0.1  # is_cancelled() is a round trip to the server: not on every token
_PUBLISH_S = 0.1  # each gauge set is a round trip too: while busy, publish at most this often
# Inputs the engine does not implement: refused unless they hold their neutral value.
_NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "length_penalty": 1.0, "beam_width": 1, "num_return_sequences": 1}


@dataclass
class _Pending:
    """A request the dispatcher owns from enqueue until its final response (then it is dropped)."""

    request: pb_utils.InferenceRequest  # kept for is_cancelled(); never used after the final flag
    sender: pb_utils.InferenceResponseSender
    stream: bool
    prefix: str  # prepended to a non-streamed text: the prompt, unless exclude_input_in_output
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    pieces: list[str] = field(default_factory=list)  # the text so far, when not streaming
    first_token_time_ns: int = 0  # wall clock, comparable with the gateway's own timestamps


class _EngineMetrics:
    """The engine's metrics on Triton's endpoint, named like TensorRT-LLM's, from its real state."""

    def __init__(self, model: str, version: str):
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
        kv_metrics = pb_utils.MetricFamily(
            name="nv_trt_llm_kv_cache_block_metrics",
            description="TRT LLM KV cache block metrics",
            kind=gauge,
        )
        self._families = [requests, tokens, request_metrics, kv_metrics]
        self.outcomes = {
            outcome: requests.Metric(labels={"model": model, "outcome": outcome})
            for outcome in ("completed", "cancelled", "error")
        }
        self.generated_tokens = tokens.Metric(labels={"model": model})
        base = {"model": model, "version": version}
        self._gauges = {
            **{("request", kind): request_metrics.Metric(labels={**base, "request_type": kind})
               for kind in _REQUEST_TYPES},
            **{("kv", kind): kv_metrics.Metric(labels={**base, "kv_cache_block_type": kind})
               for kind in _KV_TYPES},
        }
        self._published: dict[tuple[str, str], float] = {}

    def publish(self, stats: EngineStats) -> None:
        """Sets the gauges that changed (each set is a round trip to the server)."""
        values = {("request", kind): getattr(stats, kind) for kind in _REQUEST_TYPES}
        values.update({
            ("kv", "max"): stats.kv_max, ("kv", "free"): stats.kv_free,
            ("kv", "used"): stats.kv_used, ("kv", "tokens_per"): stats.kv_tokens_per,
            ("kv", "reused"): stats.kv_reused, ("kv", "fraction"): round(stats.kv_fraction, 4),
        })  # fmt: skip
        for key, value in values.items():
            if self._published.get(key) != value:
                self._gauges[key].set(value)
                self._published[key] = value

    def close(self) -> None:
        # The stub insists that metrics die before their families.
        self.outcomes.clear()
        self._gauges.clear()
        del self.generated_tokens
        self._families.clear()


def _scalar(request: pb_utils.InferenceRequest, name: str, default: Any) -> Any:
    """An optional [1, 1] input's value; one sequence per request, as the engine generates."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"{name} must hold one value per request, got shape {list(array.shape)}")
    return array.item()


def _strings(request: pb_utils.InferenceRequest, name: str) -> tuple[str, ...]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ()
    return tuple(s for s in (v.decode() for v in tensor.as_numpy().reshape(-1)) if s)


def _response(pending: _Pending, text: str) -> pb_utils.InferenceResponse:
    # Batched model: every output carries the batch dimension, shape [1, 1].
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([[pending.num_input_tokens]], np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([[pending.num_output_tokens]], np.int32)),
            pb_utils.Tensor(
                "first_token_time_ns", np.array([[pending.first_token_time_ns]], np.int64)
            ),
        ]
    )


def _engine_config(parameters: dict[str, str]) -> TorchEngineConfig:
    return TorchEngineConfig(
        num_blocks=int(parameters["num_blocks"]),
        page_size=int(parameters["page_size"]),
        max_batch_tokens=int(parameters["max_batch_tokens"]),
        dtype=parameters.get("dtype") or "float32",
        device=parameters.get("device", ""),
        threads=int(parameters.get("threads") or 0),
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = {
            key: value["string_value"]
            for key, value in json.loads(args["model_config"]).get("parameters", {}).items()
        }
        blobs = LocalBlobStore(pathlib.Path(parameters["blob_dir"]))
        cache = pathlib.Path(parameters["cache_dir"])
        # Verified before use: a tampered or corrupt weights blob fails the load here.
        model_dir = materialize_weights(blobs, json.loads(parameters["weights"]), cache)
        tokenizer_dir = materialize_files(blobs, json.loads(parameters["tokenizer_files"]), cache)
        self._engine = TorchEngine(model_dir, tokenizer_dir, _engine_config(parameters))
        self._engine.start()
        self._metrics = _EngineMetrics(args["model_name"], args["model_version"])
        self._metrics.publish(self._engine.stats())
        self._pending: dict[str, _Pending] = {}  # the dispatcher thread's alone
        self._wakeup = threading.Condition()
        self._inbox: list[tuple[_Pending, Generation]] = []  # guarded by _wakeup
        self._closed = False  # guarded by _wakeup: no more requests are accepted
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="torch-engine-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        """Parses and enqueues; every response is sent later by the dispatcher thread."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                pending, generation = self._parse(request, sender)
            except ValueError as error:  # UnicodeDecodeError included
                self._fail(sender, str(error))
                continue
            with self._wakeup:
                accepted = not self._closed
                if accepted:
                    self._inbox.append((pending, generation))
                    self._wakeup.notify()
            if not accepted:
                self._fail(sender, "the torch engine is shutting down")
        return None

    def finalize(self) -> None:
        """Stops the dispatcher (which fails whatever is unfinished), then the engine."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._dispatcher.join()
        self._engine.stop()
        self._metrics.close()

    def _parse(
        self, request: pb_utils.InferenceRequest, sender: pb_utils.InferenceResponseSender
    ) -> tuple[_Pending, Generation]:
        """The request's inputs as engine terms; ValueError names what is wrong."""
        raw_prompt = _scalar(request, "text_input", None)
        if raw_prompt is None:
            raise ValueError("text_input is required")
        max_tokens = _scalar(request, "max_tokens", None)
        if max_tokens is None:
            raise ValueError("max_tokens is required")
        for name, neutral in _NEUTRAL.items():
            value = _scalar(request, name, neutral)
            if value != neutral:
                raise ValueError(f"the torch engine supports {name}={neutral} only, got {value}")
        if _strings(request, "bad_words"):
            raise ValueError("the torch engine does not support bad_words")
        prompt = raw_prompt.decode()
        stream = bool(_scalar(request, "stream", False))
        exclude_input = bool(_scalar(request, "exclude_input_in_output", False))
        seed = _scalar(request, "seed", None)
        sampling = Sampling(
            temperature=float(_scalar(request, "temperature", 0.0)),
            top_p=float(_scalar(request, "top_p", 1.0)),
            top_k=int(_scalar(request, "top_k", 0)),
            seed=None if seed is None else int(seed),
            min_tokens=int(_scalar(request, "min_tokens", 0)),
        )
        generation = Generation(
            request_id=f"{request.request_id() or 'request'}-{id(request):x}-{time.monotonic_ns()}",
            prompt=prompt,
            max_tokens=int(max_tokens),
            sampling=sampling,
            stop=_strings(request, "stop_words"),
        )
        pending = _Pending(
            request=request,
            sender=sender,
            stream=stream,
            # As TensorRT-LLM: a non-streamed text repeats the prompt unless told not to.
            prefix="" if stream or exclude_input else prompt,
        )
        return pending, generation

    def _fail(self, sender: pb_utils.InferenceResponseSender, message: str) -> None:
        """An error response that is also the request's final one."""
        error = pb_utils.TritonError(message)
        try:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=_FINAL)
        except Exception as refused:  # nothing more can be done for this request
            pb_utils.Logger.log_error(f"torch engine: error response not sent: {refused!r}")
        self._metrics.outcomes["error"].increment(1)

    def _dispatch(self) -> None:
        """The dispatcher thread: owns the engine's requests until finalize()."""
        try:
            self._run()
        except Exception as error:  # a bug here must not leave clients waiting forever
            pb_utils.Logger.log_error(f"torch engine dispatcher failed: {error!r}")
        finally:
            with self._wakeup:
                self._closed = True
                arrivals, self._inbox = self._inbox, []
            for pending, _ in arrivals:
                self._fail(pending.sender, "the torch engine stopped")
            for request_id, pending in self._pending.items():
                self._engine.cancel(request_id)
                self._fail(pending.sender, "the torch engine stopped")
            self._pending.clear()

    def _run(self) -> None:
        next_cancel_check = next_publish = 0.0
        settled = True  # the engine holds no request and no KV block: nothing left to publish
        while True:
            with self._wakeup:
                if not (self._inbox or self._closed or self._pending):
                    # Idle; but blocks of a request just cancelled are freed on the engine's next
                    # step, so keep publishing until the cache has settled.
                    self._wakeup.wait(None if settled else _POLL_S)
                if self._closed:
                    return
                arrivals, self._inbox = self._inbox, []
            for pending, generation in arrivals:
                self._admit(pending, generation)
            now = time.monotonic()
            if now >= next_cancel_check:
                self._drop_cancelled()
                next_cancel_check = now + _CANCEL_CHECK_S
            if self._pending:
                self._deliver(self._engine.poll(_POLL_S))
            if now >= next_publish or not self._pending:
                stats = self._engine.stats()
                self._metrics.publish(stats)
                settled = stats.active == 0 and stats.waiting == 0 and stats.kv_used == 0
                next_publish = now + _PUBLISH_S

    def _admit(self, pending: _Pending, generation: Generation) -> None:
        try:
            pending.num_input_tokens = self._engine.submit(generation)
        except ValueError as error:
            self._fail(pending.sender, str(error))
            return
        self._pending[generation.request_id] = pending

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the engine (their KV blocks are freed) with an empty final."""
        for request_id, pending in list(self._pending.items()):
            if pending.request.is_cancelled():
                self._engine.cancel(request_id)
                del self._pending[request_id]
                self._send(request_id, pending, "", final=True)  # the client may be gone already
                self._metrics.outcomes["cancelled"].increment(1)

    def _deliver(self, deltas: list[Delta]) -> None:
        now_ns = time.time_ns()
        generated = 0
        for delta in deltas:
            pending = self._pending.get(delta.request_id)
            if pending is None:
                continue
            generated += delta.num_output_tokens - pending.num_output_tokens
            pending.num_output_tokens = delta.num_output_tokens
            if delta.first_token:
                pending.first_token_time_ns = now_ns
            if delta.finish_reason is FinishReason.ERROR:
                del self._pending[delta.request_id]
                self._fail(pending.sender, f"the torch engine failed: {delta.error}")
            elif delta.finish_reason is not None:
                del self._pending[delta.request_id]
                text = delta.text
                if not pending.stream:
                    text = pending.prefix + "".join(pending.pieces) + delta.text
                sent = self._send(delta.request_id, pending, text, final=True)
                self._metrics.outcomes["completed" if sent else "error"].increment(1)
            elif not pending.stream:
                pending.pieces.append(delta.text)
            elif delta.text:  # empty while a character or a possible stop string is incomplete
                if not self._send(delta.request_id, pending, delta.text, final=False):
                    self._metrics.outcomes["error"].increment(1)
        if generated:
            self._metrics.generated_tokens.increment(generated)

    def _send(self, request_id: str, pending: _Pending, text: str, final: bool) -> bool:
        """Sends one response; if the server refuses it, the request is dropped for good."""
        try:
            pending.sender.send(_response(pending, text), flags=_FINAL if final else 0)
            return True
        except Exception as error:  # its state is unknown now: touching it again could crash
            pb_utils.Logger.log_error(f"torch engine: response not sent: {error!r}")
            self._pending.pop(request_id, None)
            self._engine.cancel(request_id)
            return False
