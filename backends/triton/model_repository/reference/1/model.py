"""Triton Python backend: the reference engine behind TensorRT-LLM's `ensemble` tensor interface.

Decoupled like TensorRT-LLM's inflight batcher: `execute()` only validates and enqueues, and one
dispatcher thread runs the engine's steps over every active request, sleeps each step's modelled
time, and sends each request its new text (every token when `stream` is true, else the whole text
once). A request's last response carries the final flag; after it the request and its sender are
never touched again, because doing so crashes the whole server (ENVIRONMENT.md, Trap 3).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The stub's interpreter takes its sys.path from the first python3 on PATH, which the launcher
# makes the project's venv, where the project is installed (editable): so the pure engine is
# imported as a package module rather than copied next to this file.
from backends.triton.reference_engine import (
    EngineConfig,
    EngineStats,
    GenerationRequest,
    ReferenceEngine,
    StepTiming,
    TokenOutput,
    count_tokens,
)

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_REQUEST_TYPES = ("active", "max", "waiting", "scheduled", "context")


@dataclass
class _Pending:
    """A request the dispatcher owns from enqueue until its final response (then it is dropped)."""

    request: pb_utils.InferenceRequest  # kept for is_cancelled(); never used after the final flag
    sender: pb_utils.InferenceResponseSender
    stream: bool
    prefix: str  # prepended to a non-streamed text: the prompt, unless exclude_input_in_output
    num_input_tokens: int
    pieces: list[str] = field(default_factory=list)  # the text so far, when not streaming
    num_output_tokens: int = 0
    first_token_time_ns: int = 0  # wall clock, comparable with the gateway's own timestamps


class _EngineMetrics:
    """The engine's custom metrics on Triton's metrics endpoint, named like TensorRT-LLM's."""

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
            name="nv_trt_llm_request_metrics",
            description="TRT LLM request metrics",
            kind=gauge,
        )
        self._families = [requests, tokens, request_metrics]
        self.outcomes = {
            outcome: requests.Metric(labels={"model": model, "outcome": outcome})
            for outcome in ("completed", "cancelled", "error")
        }
        self.generated_tokens = tokens.Metric(labels={"model": model})
        self._gauges = {
            kind: request_metrics.Metric(
                labels={"model": model, "version": version, "request_type": kind}
            )
            for kind in _REQUEST_TYPES
        }
        self._published: dict[str, int] = {}

    def publish(self, stats: EngineStats) -> None:
        """Sets the gauges that changed (each set is a round trip to the server)."""
        for kind in _REQUEST_TYPES:
            value = getattr(stats, kind)
            if self._published.get(kind) != value:
                self._gauges[kind].set(value)
                self._published[kind] = value

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


def _engine_config(parameters: dict[str, str]) -> EngineConfig:
    """config.pbtxt's parameters in engine terms; any left out keep the engine's defaults."""
    timing = {
        f.name: float(parameters[f.name])
        for f in dataclasses.fields(StepTiming)
        if f.name in parameters
    }
    config: dict[str, Any] = {"timing": StepTiming(**timing)}
    if "max_active_requests" in parameters:
        config["max_active_requests"] = int(parameters["max_active_requests"])
    return EngineConfig(**config)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = {
            key: value["string_value"]
            for key, value in json.loads(args["model_config"]).get("parameters", {}).items()
        }
        self._engine = ReferenceEngine(_engine_config(parameters))  # the dispatcher thread's alone
        self._metrics = _EngineMetrics(args["model_name"], args["model_version"])
        self._metrics.publish(self._engine.stats)
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}  # the dispatcher thread's alone
        self._wakeup = threading.Condition()
        self._inbox: list[tuple[_Pending, GenerationRequest]] = []  # guarded by _wakeup
        self._closed = False  # guarded by _wakeup: no more requests are accepted
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="reference-engine-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        """Validates and enqueues; every response is sent later by the dispatcher thread."""
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
                self._fail(sender, "the reference engine is shutting down")
        return None

    def finalize(self) -> None:
        """Stops the dispatcher, which fails whatever is still unfinished."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._dispatcher.join()
        self._metrics.close()

    def _parse(
        self, request: pb_utils.InferenceRequest, sender: pb_utils.InferenceResponseSender
    ) -> tuple[_Pending, GenerationRequest]:
        """The request's inputs as engine terms; ValueError names what is wrong."""
        raw_prompt = _scalar(request, "text_input", None)
        if raw_prompt is None:
            raise ValueError("text_input is required")
        max_tokens = _scalar(request, "max_tokens", None)
        if max_tokens is None:
            raise ValueError("max_tokens is required")
        for name in ("beam_width", "num_return_sequences"):
            if _scalar(request, name, 1) != 1:
                raise ValueError(f"the reference engine supports {name}=1 only")
        prompt = raw_prompt.decode()
        stream = bool(_scalar(request, "stream", False))
        exclude_input = bool(_scalar(request, "exclude_input_in_output", False))
        generation = GenerationRequest(
            request_id=next(self._ids),
            prompt=prompt,
            max_tokens=int(max_tokens),
            seed=int(_scalar(request, "seed", 0)),
            min_tokens=int(_scalar(request, "min_tokens", 0)),
            stop=_strings(request, "stop_words"),
        )
        pending = _Pending(
            request=request,
            sender=sender,
            stream=stream,
            # As TensorRT-LLM: a non-streamed text repeats the prompt unless told not to.
            prefix="" if stream or exclude_input else prompt,
            num_input_tokens=count_tokens(prompt),
        )
        return pending, generation

    def _fail(self, sender: pb_utils.InferenceResponseSender, message: str) -> None:
        """An error response that is also the request's final one."""
        error = pb_utils.TritonError(message)
        try:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=_FINAL)
        except Exception as refused:  # nothing more can be done for this request
            pb_utils.Logger.log_error(f"reference engine: error response not sent: {refused!r}")
        self._metrics.outcomes["error"].increment(1)

    def _dispatch(self) -> None:
        """The dispatcher thread: the engine's busy loop, until finalize()."""
        try:
            self._run_steps()
        except Exception as error:  # a bug here must not leave clients waiting forever
            pb_utils.Logger.log_error(f"reference engine dispatcher failed: {error!r}")
        finally:
            with self._wakeup:
                self._closed = True
                arrivals, self._inbox = self._inbox, []
            for pending, generation in arrivals:
                self._pending[generation.request_id] = pending
            for request_id, pending in self._pending.items():
                self._engine.abort_request(request_id)
                self._fail(pending.sender, "the reference engine stopped")
            self._pending.clear()

    def _run_steps(self) -> None:
        step_end = time.monotonic()
        while True:
            with self._wakeup:
                idle = not self._engine.has_unfinished_requests()
                while not (self._inbox or self._closed or self._engine.has_unfinished_requests()):
                    self._wakeup.wait()
                if self._closed:
                    return
                arrivals, self._inbox = self._inbox, []
            for pending, generation in arrivals:
                self._pending[generation.request_id] = pending
                self._engine.add_request(generation)
            self._drop_cancelled()
            result = self._engine.step()
            now = time.monotonic()
            # While busy, the simulated accelerator runs this step as the last one's tokens are
            # delivered (as TensorRT-LLM's executor does), so delivery time is hidden up to a
            # whole step; slower delivery delays the step and no lost time is ever caught up.
            step_start = now if idle else max(step_end, now - result.duration_s)
            step_end = step_start + result.duration_s
            time.sleep(max(0.0, step_end - now))
            self._deliver(result.outputs)
            if result.outputs:
                self._metrics.generated_tokens.increment(len(result.outputs))
            self._metrics.publish(self._engine.stats)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the engine before the next step and get an empty final."""
        for request_id, pending in list(self._pending.items()):
            if pending.request.is_cancelled():
                self._engine.abort_request(request_id)
                del self._pending[request_id]
                self._send(request_id, pending, "", final=True)  # the client may be gone already
                self._metrics.outcomes["cancelled"].increment(1)

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        now_ns = time.time_ns()
        for output in outputs:
            pending = self._pending[output.request_id]
            pending.num_output_tokens = output.num_output_tokens
            if output.first_token:
                pending.first_token_time_ns = now_ns
            if output.finish_reason is not None:
                del self._pending[output.request_id]
                text = output.delta
                if not pending.stream:
                    text = pending.prefix + "".join(pending.pieces) + output.delta
                sent = self._send(output.request_id, pending, text, final=True)
                self._metrics.outcomes["completed" if sent else "error"].increment(1)
            elif not pending.stream:
                pending.pieces.append(output.delta)
            elif output.delta:  # empty while held back as a possible stop string
                sent = self._send(output.request_id, pending, output.delta, final=False)
                if not sent:
                    self._metrics.outcomes["error"].increment(1)

    def _send(self, request_id: int, pending: _Pending, text: str, final: bool) -> bool:
        """Sends one response; if the server refuses it, the request is dropped for good."""
        try:
            pending.sender.send(_response(pending, text), flags=_FINAL if final else 0)
            return True
        except Exception as error:  # its state is unknown now: touching it again could crash
            pb_utils.Logger.log_error(f"reference engine: response not sent: {error!r}")
            self._pending.pop(request_id, None)
            self._engine.abort_request(request_id)
            return False
