"""Triton Python backend: the torch engine behind TensorRT-LLM's `ensemble` tensor interface.

`initialize()` materializes what the config names (the weights blobs, verified against their
digests: a GGUF's converted copy or a Hugging Face model's files; the tokenizer files, verified)
and starts the engine's continuous batching. Decoupled like TensorRT-LLM's inflight batcher:
`execute()` only parses and enqueues; one dispatcher thread owns the engine and the tokenizer,
submits new requests, reads decoded tokens, checks for cancelled requests and sends each request
its text (every delta when `stream` is true, else the whole text once). A request's last
response carries the final flag; after it the request and its sender are never touched again,
because doing so crashes the whole server (ENVIRONMENT.md, Trap 3).
"""

from __future__ import annotations

import json
import pathlib
import threading
import time

import triton_python_backend_utils as pb_utils

# The stub takes its sys.path from the project's venv (see the reference model), so the engine
# and the weight cache are imported as package modules.
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
from backends.triton.torch_engine import (
    Delta,
    FinishReason,
    Generation,
    Sampling,
    TorchEngine,
    TorchEngineConfig,
)
from backends.triton.weights import materialize_files, materialize_weights
from services.registry.blobs import LocalBlobStore

_POLL_S = 0.02  # longest a busy dispatcher waits for tokens before it looks at its inbox again
_CANCEL_CHECK_S = 0.1  # is_cancelled() is a round trip to the server: not on every token
_PUBLISH_S = 0.1  # each gauge set is a round trip too: while busy, publish at most this often
# Inputs the engine does not implement: refused unless they hold their neutral value.
_NEUTRAL = {"length_penalty": 1.0, "beam_width": 1, "num_return_sequences": 1}


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
        report_crashes()
        started = time.monotonic()
        parameters = model_parameters(args)
        blobs = LocalBlobStore(pathlib.Path(parameters["blob_dir"]))
        cache = pathlib.Path(parameters["cache_dir"])
        # Verified before use: a tampered or corrupt weights blob fails the load here. The
        # tokenizer always comes from its own pinned files, whatever form the weights take.
        model_dir = materialize_weights(blobs, json.loads(parameters["weights"]), cache)
        tokenizer_dir = materialize_files(blobs, json.loads(parameters["tokenizer_files"]), cache)
        self._engine = TorchEngine(model_dir, tokenizer_dir, _engine_config(parameters))
        self._engine.start()
        pb_utils.Logger.log_info(
            f"torch engine {args['model_name']}: weights {model_dir.name[:12]} verified and "
            f"loaded in {time.monotonic() - started:.1f}s in "
            f"{self._engine.config.resolved_dtype}; {self._engine.config}")
        self._metrics = EngineMetrics(args["model_name"], args["model_version"], kv_cache=True)
        self._metrics.publish(self._engine.stats())
        self._kv_events = KvEventPublisher(args["model_name"], events_directory())
        if self._kv_events.serving_error:
            pb_utils.Logger.log_error(self._kv_events.serving_error)
        self._kv_events.publish(self._engine.kv_events())  # AllBlocksCleared: a fresh cache
        self._pending: dict[str, Pending] = {}  # the dispatcher thread's alone
        self._inbox = Inbox()  # of (Pending, Generation)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="torch-engine-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        """Parses and enqueues; every response is sent later by the dispatcher thread."""
        enqueue(requests, self._parse, self._inbox, self._fail, "torch engine")

    def finalize(self) -> None:
        """Stops the dispatcher (which fails whatever is unfinished), then the engine."""
        self._inbox.close()
        self._dispatcher.join()
        self._engine.stop()
        self._kv_events.close()
        self._metrics.close()

    def _parse(
        self, request: pb_utils.InferenceRequest, sender: pb_utils.InferenceResponseSender
    ) -> tuple[Pending, Generation]:
        """The request's inputs as engine terms; ValueError names what is wrong."""
        prompt, max_tokens, pending = parse_text_request(request, sender)
        for name, neutral in _NEUTRAL.items():
            value = scalar(request, name, neutral)
            if value != neutral:
                raise ValueError(f"the torch engine supports {name}={neutral} only, got {value}")
        if strings(request, "bad_words"):
            raise ValueError("the torch engine does not support bad_words")
        seed = scalar(request, "seed", None)
        sampling = Sampling(
            temperature=float(scalar(request, "temperature", 0.0)),
            top_p=float(scalar(request, "top_p", 1.0)),
            top_k=int(scalar(request, "top_k", 0)),
            seed=None if seed is None else int(seed),
            min_tokens=int(scalar(request, "min_tokens", 0)),
            repetition_penalty=float(scalar(request, "repetition_penalty", 1.0)),
            presence_penalty=float(scalar(request, "presence_penalty", 0.0)),
            frequency_penalty=float(scalar(request, "frequency_penalty", 0.0)),
            logit_bias=logit_bias(request),
            top_logprobs=pending.top_logprobs,
        )
        # Compiled here, before the dispatcher admits it: never on the generation thread.
        guide = guided_decoding(request)
        generation = Generation(
            request_id=f"{request.request_id() or 'request'}-{id(request):x}-{time.monotonic_ns()}",
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=strings(request, "stop_words"),
            guide=None if guide is None else self._engine.compile_guide(*guide),
            continued=token_ids(request, "continue_ids"),
            cache_salt=scalar(request, "cache_salt", b"").decode(),
        )
        return pending, generation

    def _fail(self, sender: pb_utils.InferenceResponseSender, message: str) -> None:
        send_error(sender, message, "torch engine")
        self._metrics.outcomes["error"].increment(1)

    def _dispatch(self) -> None:
        """The dispatcher thread: owns the engine's requests until finalize()."""
        try:
            self._run()
        except Exception as error:  # a bug here must not leave clients waiting forever
            pb_utils.Logger.log_error(f"torch engine dispatcher failed: {error!r}")
        finally:
            for pending, _ in self._inbox.close():
                self._fail(pending.sender, stopped("torch engine"))
            for request_id, pending in self._pending.items():
                self._engine.cancel(request_id)
                self._fail(pending.sender, stopped("torch engine"))
            self._pending.clear()

    def _run(self) -> None:
        next_cancel_check = next_publish = 0.0
        settled = True  # the engine holds no request and no KV block: nothing left to publish
        while True:
            # Idle, it sleeps until a request comes; but blocks of a request just cancelled are
            # freed on the engine's next step, so it keeps publishing until the cache settled.
            arrivals = self._inbox.take(wait=not self._pending,
                                        timeout_s=None if settled else _POLL_S)
            if arrivals is None:
                return
            for pending, generation in arrivals:
                self._admit(pending, generation)
            now = time.monotonic()
            if now >= next_cancel_check:
                self._drop_cancelled()
                next_cancel_check = now + _CANCEL_CHECK_S
            if self._pending:
                self._deliver(self._engine.poll(_POLL_S))
            # Every turn while busy (a read of the cache's hash table): the routing lag.
            self._kv_events.publish(self._engine.kv_events())
            if now >= next_publish or not self._pending:
                stats = self._engine.stats()
                self._metrics.publish(stats)
                settled = stats.active == 0 and stats.waiting == 0 and stats.kv_used == 0
                next_publish = now + _PUBLISH_S

    def _admit(self, pending: Pending, generation: Generation) -> None:
        try:
            pending.num_input_tokens = self._engine.submit(generation)
        except ValueError as error:
            self._fail(pending.sender, refused(error))
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
            pending.token_ids.extend(delta.token_ids)
            pending.logprobs.extend(self._spelled(delta))
            if delta.first_token:
                pending.first_token_time_ns = now_ns
            if delta.finish_reason is FinishReason.ERROR:
                del self._pending[delta.request_id]
                self._fail(pending.sender, refused(ValueError(delta.error)) if delta.refused
                           else f"the torch engine failed: {delta.error}")
            elif delta.finish_reason is not None:
                del self._pending[delta.request_id]
                text = delta.text
                if not pending.stream:
                    text = pending.prefix + "".join(pending.pieces) + delta.text
                sent = self._send(delta.request_id, pending, text, final=True)
                self._metrics.outcomes["completed" if sent else "error"].increment(1)
            elif not pending.stream:
                pending.pieces.append(delta.text)
            # delta.text is empty while a character or a possible stop string is incomplete
            elif delta.text and not self._send(delta.request_id, pending, delta.text, final=False):
                self._metrics.outcomes["error"].increment(1)
        if generated:
            self._metrics.generated_tokens.increment(generated)

    def _spelled(self, delta: Delta) -> list[SentLogprob]:
        """The delta's log probabilities with each token's text (sent as its UTF-8 bytes)."""
        text = self._engine.token_text
        return [SentLogprob(text(lp.token_id).encode(), lp.logprob,
                            tuple((text(t).encode(), v) for t, v in lp.top))
                for lp in delta.logprobs]

    def _send(self, request_id: str, pending: Pending, text: str, final: bool) -> bool:
        """Sends one response; if the server refuses it, the request is dropped for good."""
        if send(pending, text, final, "torch engine"):
            return True
        self._pending.pop(request_id, None)
        self._engine.cancel(request_id)
        return False
