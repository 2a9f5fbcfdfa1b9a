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
import threading
import time
from typing import Any

import triton_python_backend_utils as pb_utils

# The stub's interpreter takes its sys.path from the first python3 on PATH, which the launcher
# makes the project's venv, where the project is installed (editable): so the pure engine is
# imported as a package module rather than copied next to this file.
from backends.triton.decoupled_model import (
    EngineMetrics,
    Inbox,
    Pending,
    SentLogprob,
    enqueue,
    guided_decoding,
    logit_bias,
    model_parameters,
    parse_text_request,
    refused,
    report_crashes,
    scalar,
    send,
    send_error,
    stopped,
    strings,
    token_ids,
)
from backends.triton.kv_event_socket import KvEventPublisher, events_directory
from backends.triton.reference_engine import (
    EngineConfig,
    GenerationRequest,
    ReferenceEngine,
    StepTiming,
    TokenOutput,
    count_tokens,
    guided_text,
    made_up_logprobs,
)


def _engine_config(parameters: dict[str, str]) -> EngineConfig:
    """config.pbtxt's parameters in engine terms; any left out keep the engine's defaults."""
    timing = {
        f.name: float(parameters[f.name])
        for f in dataclasses.fields(StepTiming)
        if f.name in parameters
    }
    config: dict[str, Any] = {"timing": StepTiming(**timing)}
    for name in ("max_active_requests", "kv_cache_blocks", "kv_block_tokens"):
        if name in parameters:
            config[name] = int(parameters[name])
    return EngineConfig(**config)


_NEUTRAL_PENALTIES = (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                      ("frequency_penalty", 0.0))


def _sampling_key(request: pb_utils.InferenceRequest) -> str:
    """The penalties and logit_bias that are set, as text ("" when all are neutral)."""
    values = [(name, float(scalar(request, name, neutral))) for name, neutral in _NEUTRAL_PENALTIES]
    key = "".join(f"\x00{name}={value!r}" for (name, value), (_, neutral)
                  in zip(values, _NEUTRAL_PENALTIES, strict=True) if value != neutral)
    bias = logit_bias(request)
    return key + (f"\x00logit_bias={sorted(bias)!r}" if bias else "")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        report_crashes()
        parameters = model_parameters(args)
        self._engine = ReferenceEngine(_engine_config(parameters))  # the dispatcher thread's alone
        self._metrics = EngineMetrics(args["model_name"], args["model_version"], kv_cache=True,
                                      prefix_cache=True)
        self._metrics.publish(self._engine.stats)
        self._kv_events = KvEventPublisher(args["model_name"], events_directory())
        if self._kv_events.serving_error:
            pb_utils.Logger.log_error(self._kv_events.serving_error)
        self._kv_events.publish(self._engine.kv_events())  # AllBlocksCleared: a fresh cache
        self._ids = itertools.count()
        self._pending: dict[int, Pending] = {}  # the dispatcher thread's alone
        self._inbox = Inbox()  # of (Pending, GenerationRequest)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="reference-engine-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        """Validates and enqueues; every response is sent later by the dispatcher thread."""
        enqueue(requests, self._parse, self._inbox, self._fail, "reference engine")

    def finalize(self) -> None:
        """Stops the dispatcher, which fails whatever is still unfinished."""
        self._inbox.close()
        self._dispatcher.join()
        self._kv_events.close()
        self._metrics.close()

    def _parse(
        self, request: pb_utils.InferenceRequest, sender: pb_utils.InferenceResponseSender
    ) -> tuple[Pending, GenerationRequest]:
        """The request's inputs as engine terms; ValueError names what is wrong."""
        prompt, max_tokens, pending = parse_text_request(request, sender)
        for name in ("beam_width", "num_return_sequences"):
            if scalar(request, name, 1) != 1:
                raise ValueError(f"the reference engine supports {name}=1 only")
        guide = guided_decoding(request)
        generation = GenerationRequest(
            request_id=next(self._ids),
            prompt=prompt,
            max_tokens=max_tokens,
            seed=int(scalar(request, "seed", 0)),
            min_tokens=int(scalar(request, "min_tokens", 0)),
            stop=strings(request, "stop_words"),
            cache_salt=scalar(request, "cache_salt", b"").decode(),
            sampling_key=_sampling_key(request),
            guided_text=None if guide is None else guided_text(*guide, max_tokens),
            continued=token_ids(request, "continue_ids"),
        )
        pending.num_input_tokens = count_tokens(prompt) + len(generation.continued)
        return pending, generation

    def _fail(self, sender: pb_utils.InferenceResponseSender, message: str) -> None:
        send_error(sender, message, "reference engine")
        self._metrics.outcomes["error"].increment(1)

    def _dispatch(self) -> None:
        """The dispatcher thread: the engine's busy loop, until finalize()."""
        try:
            self._run_steps()
        except Exception as error:  # a bug here must not leave clients waiting forever
            pb_utils.Logger.log_error(f"reference engine dispatcher failed: {error!r}")
        finally:
            for pending, generation in self._inbox.close():
                self._pending[generation.request_id] = pending
            for request_id, pending in self._pending.items():
                self._engine.abort_request(request_id)
                self._fail(pending.sender, stopped("reference engine"))
            self._pending.clear()

    def _run_steps(self) -> None:
        step_end = time.monotonic()
        while True:
            idle = not self._engine.has_unfinished_requests()
            arrivals = self._inbox.take(wait=idle)
            if arrivals is None:
                return
            if idle and not arrivals:
                continue  # woken with nothing to do
            for pending, generation in arrivals:
                try:
                    self._engine.add_request(generation)
                except ValueError as error:  # a prompt the KV cache can never hold
                    self._fail(pending.sender, refused(error))
                    continue
                self._pending[generation.request_id] = pending
            self._drop_cancelled()
            result = self._engine.step()
            self._kv_events.publish(self._engine.kv_events())
            now = time.monotonic()
            # While busy, the simulated accelerator runs this step as the last one's tokens are
            # delivered (as TensorRT-LLM's executor does), so delivery time is hidden up to a
            # whole step; slower delivery delays the step and no lost time is ever caught up.
            step_start = now if idle else max(step_end, now - result.duration_s)
            step_end = step_start + result.duration_s
            time.sleep(max(0.0, step_end - now))
            # Metrics first: a client that has its final response then reads them up to date.
            if result.outputs:
                self._metrics.generated_tokens.increment(len(result.outputs))
            self._metrics.count_prefill(result.prefilled_tokens, result.cached_tokens)
            self._metrics.publish(self._engine.stats)
            self._deliver(result.outputs)
            self._metrics.publish(self._engine.stats)  # a refused send drops its request

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
            pending.token_ids.append(output.token_id)
            if pending.top_logprobs >= 0:
                logprob, top = made_up_logprobs(output.token, pending.top_logprobs)
                pending.logprobs.append(SentLogprob(
                    output.token.encode(), logprob, tuple((t.encode(), v) for t, v in top)))
            if output.first_token:
                pending.first_token_time_ns = now_ns
                pending.kv_cache_reused_blocks = output.kv_cache_reused_blocks
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

    def _send(self, request_id: int, pending: Pending, text: str, final: bool) -> bool:
        """Sends one response; if the server refuses it, the request is dropped for good."""
        if send(pending, text, final, "reference engine"):
            return True
        self._pending.pop(request_id, None)
        self._engine.abort_request(request_id)
        return False
