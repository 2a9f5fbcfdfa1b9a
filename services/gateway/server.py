"""The public Inference servicer: decodes frames, runs `GenerationPipeline`, encodes frames.

`GenerateStream` multiplexes generations by request id: each runs in its own task, writing into
one bounded frame queue that the RPC drains (so a slow client slows its own generations only).
A `Cancel` frame cancels that generation's task; a disconnect cancels them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2

from backends.triton.adapter import TritonAdapter
from backends.triton.weights import cache_root
from infermesh.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2
from services.common import errors, etcd, status, telemetry
from services.common.auth import Authenticator
from services.common.discovery import ServiceDirectory
from services.common.frames import MalformedFrame, add_servicer
from services.common.logprobs import TokenLogprob
from services.common.logs import get_logger
from services.common.runtime import ServiceContext, ServiceParts
from services.common.tenancy import TenantStore, parse_key, parse_tenant
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.audit import AuditEmitter, AuditSpoolSettings
from services.gateway.choices import run_choices
from services.gateway.failover import FailoverSettings
from services.gateway.fallback import FallbackConfig, FallbackRouter, LoadReports, ResilientRouting
from services.gateway.idempotency import IdempotencyCache
from services.gateway.model_access import model_allowed
from services.gateway.openai_http import HttpServer, OpenAIFront
from services.gateway.peers import SchedulerClient
from services.gateway.pipeline import (
    Accepted,
    Event,
    Finished,
    GenerationPipeline,
    Send,
    TokenText,
)
from services.gateway.quota import QuotaLeases
from services.gateway.requests import (
    ChatTurn,
    GenerationRequest,
    Principal,
    ResponseFormat,
    SamplingRequest,
)
from services.gateway.response_cache import ResponseCache
from services.gateway.serving import ServedModels
from services.gateway.settings import GatewaySettings
from services.gateway.shadow import ShadowTraffic
from services.gateway.tenant_admin import TenantAdminServicer
from services.gateway.tokenizers import TokenizerStore
from services.gateway.tool_calls import Tool, ToolCall, answer_calls, call_id, calls_text
from services.gateway.validation import Limits, validate_request_id
from services.registry.blob_cache import BlobCache
from services.registry.catalog import ModelCatalog
from services.registry.client import mesh_download

log = get_logger(__name__)
STREAM_REFUSAL_DRAIN_S = 0.2
FINISH_REASONS = {
    "stop": inference_pb2.STOP,
    "length": inference_pb2.LENGTH,
    "content_filter": inference_pb2.CONTENT_FILTER,
    "cancelled": inference_pb2.CANCELLED,
    "deadline": inference_pb2.DEADLINE,
    "error": inference_pb2.ERROR,
}

RESPONSE_FORMATS = {
    inference_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text",
    inference_pb2.RESPONSE_FORMAT_TYPE_TEXT: "text",
    inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}

TOOL_CHOICE_MODES = {
    inference_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: "",
    inference_pb2.TOOL_CHOICE_MODE_NONE: "none",
    inference_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    inference_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
    inference_pb2.TOOL_CHOICE_MODE_FUNCTION: "function",
}


def _turn(message: inference_pb2.ChatMessage) -> ChatTurn:
    """A message as the model reads it: earlier calls in the form it writes them."""
    if not message.tool_calls:
        return ChatTurn(message.role, message.content)
    calls = calls_text(tuple(ToolCall(c.name, c.arguments) for c in message.tool_calls))
    return ChatTurn(message.role, f"{message.content}\n{calls}" if message.content else calls)


def decode_request(message: inference_pb2.GenerateRequest) -> GenerationRequest:
    """Protobuf → our dataclass; the request id is checked here (it keys the stream)."""
    params = message.params
    has = params.HasField
    sampling = SamplingRequest(
        max_tokens=params.max_tokens if has("max_tokens") else None,
        temperature=params.temperature if has("temperature") else None,
        top_p=params.top_p if has("top_p") else None,
        top_k=params.top_k if has("top_k") else None,
        stop=tuple(params.stop),
        bad_words=tuple(params.bad_words),
        seed=params.seed if has("seed") else None,
        repetition_penalty=params.repetition_penalty if has("repetition_penalty") else None,
        presence_penalty=params.presence_penalty if has("presence_penalty") else None,
        frequency_penalty=params.frequency_penalty if has("frequency_penalty") else None,
        min_tokens=params.min_tokens if has("min_tokens") else None,
        logit_bias=tuple(sorted(params.logit_bias.items())),
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs if has("top_logprobs") else None,
        n=params.n if has("n") else 1,
    )
    which = message.WhichOneof("input")
    return GenerationRequest(
        request_id=validate_request_id(message.request_id),
        model=message.model,
        prompt=message.prompt if which == "prompt" else None,
        messages=tuple(_turn(m) for m in message.messages.messages)
        if which == "messages" else None,
        sampling=sampling,
        idempotency_key=message.idempotency_key,
        priority=int(message.priority),
        user=message.user,
        timeout_s=_timeout_seconds(message.timeout) if message.HasField("timeout") else None,
        tools=tuple(Tool(t.name, t.description, t.parameters or '{"type":"object"}')
                    for t in message.tools),
        tool_choice=TOOL_CHOICE_MODES.get(message.tool_choice.mode, "unknown"),
        tool_choice_name=message.tool_choice.function_name,
        parallel_tool_calls=(message.parallel_tool_calls
                             if message.HasField("parallel_tool_calls") else True),
        response_format=ResponseFormat(
            type=RESPONSE_FORMATS.get(message.response_format.type, "unknown"),
            json_schema=message.response_format.json_schema,
            name=message.response_format.name,
        ),
    )


def _timeout_seconds(timeout: duration_pb2.Duration) -> float:
    """The Duration as seconds, never raising: any int64 fits a float, and the range is checked
    with the other limits (`validation.check_parameters`)."""
    if not -999_999_999 <= timeout.nanos <= 999_999_999:
        raise errors.InvalidArgument("timeout", "nanos must be within ±999 999 999")
    return timeout.seconds + timeout.nanos / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    return status.seconds_to_duration(seconds)


def _failover(finished: Finished) -> inference_pb2.Failover | None:
    if not finished.moves:
        return None
    return inference_pb2.Failover(moves=finished.moves,
                                  continuation_exact=finished.continuation_exact)


def encode_final(finished: Finished) -> inference_pb2.Final:
    final = inference_pb2.Final(
        request_id=finished.request_id,
        finish_reason=FINISH_REASONS[finished.finish_reason],
        usage=inference_pb2.Usage(
            prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
            cached=finished.cached,
        ),
        choices=[inference_pb2.Choice(index=end.index,
                                      finish_reason=FINISH_REASONS[end.finish_reason],
                                      completion_tokens=end.completion_tokens)
                 for end in finished.choices],
        timings=inference_pb2.Timings(
            queue=_duration(finished.queue_s),
            time_to_first_token=_duration(finished.ttft_s),
            total=_duration(finished.total_s),
        ),
        model_version=finished.model_version,
        failover=_failover(finished),
    )
    if finished.error is not None:
        final.error.code = finished.error.code
        final.error.message = finished.error.message
        final.error.field = finished.error.field
        final.error.reason = finished.error.reason
        if finished.error.retry_after_s is not None:
            final.error.retry_after.CopyFrom(_duration(finished.error.retry_after_s))
    return final


def encode_logprobs(logprobs: Sequence[TokenLogprob]) -> list[inference_pb2.TokenLogprob]:
    return [inference_pb2.TokenLogprob(
        token=lp.token, logprob=lp.logprob, bytes=lp.token_bytes,
        top_logprobs=[inference_pb2.TopLogprob(token=t.token, logprob=t.logprob,
                                               bytes=t.token_bytes) for t in lp.top])
        for lp in logprobs]


def encode_tool_calls(calls: Sequence[ToolCall], request_id: str
                      ) -> list[inference_pb2.ToolCall]:
    return [inference_pb2.ToolCall(id=call_id(request_id, index), name=call.name,
                                   arguments=call.arguments)
            for index, call in enumerate(calls)]


class _ToolCallingSend:
    """A streamed generation that offered tools: its frames as any other's, its answer's text
    kept (choice 0's) so that its Final carries the calls the answer makes."""

    def __init__(self, request: GenerationRequest, frames: asyncio.Queue):
        self._request = request
        self._frames = frames
        self._pieces: list[str] = []

    async def __call__(self, event: Event) -> None:
        frame = encode_event(event)
        if isinstance(event, TokenText) and event.index == 0:
            self._pieces.append(event.text)
        elif isinstance(event, Finished):
            calls = answer_calls(self._request.tools, self._request.tool_choice,
                                 "".join(self._pieces))
            if calls:
                frame.final.tool_calls.extend(encode_tool_calls(calls, event.request_id))
                if event.finish_reason == "stop":
                    frame.final.finish_reason = inference_pb2.TOOL_CALLS
        await self._frames.put(frame)


def encode_event(event: Event) -> inference_pb2.ServerFrame:
    if isinstance(event, TokenText):
        return inference_pb2.ServerFrame(tokens=inference_pb2.Tokens(
            request_id=event.request_id, text=event.text,
            logprobs=encode_logprobs(event.logprobs), index=event.index))
    if isinstance(event, Accepted):
        return inference_pb2.ServerFrame(
            accepted=inference_pb2.Accepted(
                request_id=event.request_id, model_version=event.model_version
            )
        )
    return inference_pb2.ServerFrame(final=encode_final(event))


def _rpc_attributes(method: str) -> dict[str, str]:
    """A gRPC front's attributes for the generation's span (rpc.* semantic conventions)."""
    return {"rpc.system": "grpc", "rpc.service": "infermesh.v1.Inference", "rpc.method": method}


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return str(value)
    return None


class Generations:
    """Runs generations through the pipeline, once per idempotency key; a request for n choices
    as n generations (`choices.run_choices`)."""

    def __init__(self, pipeline: GenerationPipeline, idempotency: IdempotencyCache,
                 max_choices: int = 1):
        self._pipeline = pipeline
        self._idempotency = idempotency
        self._max_choices = max_choices

    async def run(
        self, principal: Principal, request: GenerationRequest, send: Send, peer: str,
        trace: telemetry.FrontTrace | None = None,
    ) -> Finished:
        """`trace`: the front's, when tracing is on: the generation runs in its root span."""
        structlog.contextvars.bind_contextvars(request_id=request.request_id,
                                               tenant=principal.tenant_id)
        if trace is None:
            return await self._run(principal, request, send, peer)
        operation = "chat" if request.messages is not None else "text_completion"
        with telemetry.generation_span(trace, f"{operation} {request.model}", {
                "gen_ai.operation.name": operation, "gen_ai.provider.name": "infermesh",
                "gen_ai.request.model": request.model,
                "infermesh.request_id": request.request_id,
                "infermesh.tenant": principal.tenant_id}) as span:
            finished = await self._run(principal, request, send, peer)
            if span is not None and span.is_recording():
                span.set_attributes({
                    "gen_ai.response.model": finished.model_version,
                    "gen_ai.response.finish_reasons": (finished.finish_reason,),
                    "gen_ai.usage.input_tokens": finished.prompt_tokens,
                    "gen_ai.usage.output_tokens": finished.completion_tokens,
                    "infermesh.status_code": finished.error.code if finished.error else "OK"})
                if finished.error is not None:
                    span.set_attribute("error.type", finished.error.code)
                    telemetry.set_error(span, finished.error.code, finished.error.message)
                # A sampled generation is one an operator follows: its line joins the trace.
                log.info("generation_finished", finish_reason=finished.finish_reason,
                         code=finished.error.code if finished.error else "OK",
                         model_version=finished.model_version,
                         prompt_tokens=finished.prompt_tokens,
                         completion_tokens=finished.completion_tokens,
                         ttft_ms=round(finished.ttft_s * 1000, 1),
                         total_ms=round(finished.total_s * 1000, 1))
            return finished

    async def _run(
        self, principal: Principal, request: GenerationRequest, send: Send, peer: str
    ) -> Finished:
        try:
            return await run_choices(
                lambda one, sink: self._run_one(principal, one, sink, peer), request, send,
                self._max_choices)
        except errors.MeshError as exc:  # n over the limit
            finished = Finished(request_id=request.request_id, finish_reason="error", error=exc)
            await send(finished)
            return finished

    async def _run_one(
        self, principal: Principal, request: GenerationRequest, send: Send, peer: str
    ) -> Finished:
        try:
            return await self._idempotency.run(
                principal.tenant_id, request, send,
                lambda sink: self._pipeline.run(principal, request, sink, peer),
            )
        except errors.MeshError as exc:  # the key was misused; the pipeline reports its own
            finished = Finished(request_id=request.request_id, finish_reason="error", error=exc)
            await send(finished)
            return finished


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, authenticator: Authenticator, catalog: ModelCatalog,
        generations: Generations, settings: GatewaySettings, draining: asyncio.Event,
    ):
        self._auth = authenticator
        self._catalog = catalog
        self._generations = generations
        self._settings = settings
        self._draining = draining

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        try:
            return self._auth.authenticate(_metadata(context, "authorization"))
        except errors.MeshError as exc:
            await status.abort(context, exc)
            raise  # unreachable: abort raises

    async def Generate(self, request, context):
        trace = telemetry.front_trace(context.invocation_metadata() or (),
                                      **_rpc_attributes("Generate"))
        principal = await self._principal(context)
        if trace is not None:
            trace.authenticated()
        if isinstance(request, MalformedFrame):
            await status.abort(context, request.error())
        try:
            decoded = decode_request(request)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        remaining = context.time_remaining()
        if remaining is not None and (decoded.timeout_s is None or remaining < decoded.timeout_s):
            decoded = dataclasses.replace(decoded, timeout_s=max(remaining, 1e-3))
        pieces: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}

        async def collect(event: Event) -> None:
            if isinstance(event, TokenText):
                pieces.setdefault(event.index, []).append(event.text)
                logprobs.setdefault(event.index, []).extend(event.logprobs)

        finished = await self._generations.run(principal, decoded, collect, context.peer(),
                                               trace)
        if finished.error is not None:
            await status.abort(context, finished.error)
        text = "".join(pieces.get(0, ()))
        calls = answer_calls(decoded.tools, decoded.tool_choice, text) or ()
        finish_reason = FINISH_REASONS[finished.finish_reason]
        if calls and finished.finish_reason == "stop":
            finish_reason = inference_pb2.TOOL_CALLS
        return inference_pb2.GenerateResponse(
            request_id=finished.request_id,
            model_version=finished.model_version,
            text=text,
            tool_calls=encode_tool_calls(calls, finished.request_id),
            finish_reason=finish_reason,
            usage=encode_final(finished).usage,
            timings=encode_final(finished).timings,
            logprobs=encode_logprobs(logprobs.get(0, ())),
            choices=[inference_pb2.Choice(
                index=end.index, text="".join(pieces.get(end.index, ())),
                finish_reason=FINISH_REASONS[end.finish_reason],
                completion_tokens=end.completion_tokens,
                logprobs=encode_logprobs(logprobs.get(end.index, ())))
                for end in finished.choices],
            failover=_failover(finished),
        )

    async def GenerateStream(self, request_iterator, context):
        authorization = _metadata(context, "authorization")
        try:
            principal = self._auth.authenticate(authorization)
        except errors.MeshError as exc:
            await status.abort_stream(context, exc, request_iterator)
        session = _StreamSession(
            self._generations, _Credential(self._auth, authorization, principal), context.peer(),
            self._settings, self._draining, context.invocation_metadata() or (),
        )
        reader = asyncio.create_task(session.read(request_iterator), name="stream reader")
        watcher = asyncio.create_task(session.watch_credential(), name="stream key watch")
        try:
            async for frame in session.frames():
                yield frame
            if session.failure is not None:  # a malformed frame, or the key stopped being valid
                await session.cancel_all()
                # Let the reader drain what the client is still writing (briefly: the key's
                # end must reach the client within a second), so the status reaches it as
                # sent rather than as "Internal error from Core".
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    async with asyncio.timeout(STREAM_REFUSAL_DRAIN_S):
                        await asyncio.shield(reader)
                await status.abort(context, session.failure)
        finally:
            reader.cancel()
            watcher.cancel()
            await session.cancel_all()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def ListModels(self, request, context):
        principal = await self._principal(context)
        if isinstance(request, MalformedFrame):
            await status.abort(context, request.error())
        return inference_pb2.ListModelsResponse(
            models=[self._model_info(entry.name) for entry in self._catalog.models()
                    if model_allowed(principal, entry.name)]
        )

    async def GetModel(self, request, context):
        principal = await self._principal(context)
        try:
            if isinstance(request, MalformedFrame):
                raise request.error()
            if not model_allowed(principal, request.name):
                raise errors.PermissionDenied(
                    f"tenant {principal.tenant_id!r} may not use model {request.name[:64]!r}",
                    field="name")
            return self._model_info(request.name)
        except errors.MeshError as exc:
            await status.abort(context, exc)

    def _model_info(self, name: str) -> inference_pb2.ModelInfo:
        entry = self._catalog.entry(name)
        routing = entry.routing
        info = inference_pb2.ModelInfo(
            name=name, production_version=routing.production, canary_version=routing.canary,
            canary_weight_percent=routing.canary_weight_percent, routing_revision=routing.revision,
        )
        version = entry.versions.get(routing.production)
        if version is not None:
            info.context_window = version.context_window
            info.max_output_tokens = version.max_output_tokens
            info.description = version.manifest.get("description", "")
            info.cost_per_1k_input_tokens = version.cost_per_1k_input_tokens
            info.cost_per_1k_output_tokens = version.cost_per_1k_output_tokens
        return info


class _Credential:
    """A stream's bearer key, checked again on every Start and every `reauth_interval_s`."""

    def __init__(self, authenticator: Authenticator, authorization: str | None,
                 principal: Principal):
        self._auth = authenticator
        self._authorization = authorization
        self.principal = principal

    def check(self) -> Principal:
        """The principal now (a changed plan included); Unauthenticated once the key was
        revoked or expired or its tenant deleted."""
        self.principal = self._auth.authenticate(self._authorization)
        return self.principal


class _StreamSession:
    """The state of one GenerateStream: its generations by request id and its frame queue.

    The key is checked again on every Start and every `reauth_interval_s`: once it is revoked or
    expired (or its tenant deleted) the stream ends with UNAUTHENTICATED within that interval,
    cancelling the generations in flight; a changed plan applies to the next Start, those in
    flight keep what they were admitted with. Past `max_stream_age_s` new Starts are refused and
    the stream ends when those in flight finish (docs/decisions.md)."""

    def __init__(
        self, generations: Generations, credential: _Credential, peer: str,
        settings: GatewaySettings, draining: asyncio.Event,
        metadata: Sequence[tuple[str, Any]] = (),
    ):
        """`metadata`: the stream's, whose `traceparent` parents each generation's trace."""
        self._generations = generations
        self._metadata = metadata
        self._credential = credential
        self._peer = peer
        self._opened = time.monotonic()
        self.failure: errors.MeshError | None = None  # ends the stream with this status
        self._settings = settings
        self._draining = draining
        # Frames for the client, and None: a wake-up (something `frames` checks changed).
        self._frames: asyncio.Queue[inference_pb2.ServerFrame | None] = asyncio.Queue(
            settings.stream_buffer_frames
        )
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._input_done = asyncio.Event()

    async def send(self, event: Event) -> None:
        await self._frames.put(encode_event(event))

    def _too_old(self) -> bool:
        return time.monotonic() - self._opened >= self._settings.max_stream_age_s

    async def watch_credential(self) -> None:
        """Ends the stream once its key is no longer valid; wakes it once it is too old."""
        while self.failure is None:
            await asyncio.sleep(self._settings.reauth_interval_s)
            try:
                self._credential.check()
            except errors.MeshError as exc:
                self._fail(exc)
                return
            if self._too_old():
                self._wake()

    def _wake(self) -> None:
        """Makes `frames` check again whether the stream ends. A full queue needs no wake-up:
        `frames` checks before it waits on an empty one."""
        with contextlib.suppress(asyncio.QueueFull):
            self._frames.put_nowait(None)

    def _fail(self, error: errors.MeshError) -> None:
        if self.failure is None:
            self.failure = error
        self._wake()

    async def read(self, request_iterator) -> None:
        index = 0
        try:
            async for frame in request_iterator:
                if self.failure is not None:
                    continue  # draining what the client still sends before the status
                if isinstance(frame, MalformedFrame):
                    self._fail(frame.error(f"frame[{index}]"))
                    continue
                index += 1
                kind = frame.WhichOneof("frame")
                if kind == "start":
                    await self._start(frame.start)
                elif kind == "cancel":
                    task = self._tasks.get(frame.cancel.request_id)
                    if task is not None:
                        task.cancel()
        finally:
            self._input_done.set()
            self._wake()

    async def _start(self, message: inference_pb2.GenerateRequest) -> None:
        request_id = message.request_id if len(message.request_id) <= 128 else ""
        trace = telemetry.front_trace(self._metadata, **_rpc_attributes("GenerateStream"))
        try:
            principal = self._credential.check()
        except errors.MeshError as exc:
            self._fail(exc)
            return
        if trace is not None:
            trace.authenticated()
        try:
            if self._too_old():
                raise errors.Unavailable(
                    f"this stream is older than {self._settings.max_stream_age_s:g}s; open a "
                    "new one", retry_after_s=0.0, reason="stream_max_age")
            request = decode_request(message)
            request_id = request.request_id
            if request_id in self._tasks:
                raise errors.InvalidArgument(
                    "request_id", f"{request_id!r} is already running on this stream"
                )
            if len(self._tasks) >= self._settings.max_generations_per_stream:
                raise errors.ResourceExhausted(
                    f"at most {self._settings.max_generations_per_stream} generations per stream",
                    retry_after_s=0.1,
                )
            if self._draining.is_set():
                raise errors.Unavailable("the gateway is shutting down", retry_after_s=0.1)
        except errors.MeshError as exc:
            await self.send(Finished(request_id=request_id, finish_reason="error", error=exc))
            return
        task = asyncio.create_task(self._generate(request, principal, trace),
                                   name=f"generation {request_id}")
        self._tasks[request_id] = task

    async def _generate(self, request: GenerationRequest, principal: Principal,
                        trace: telemetry.FrontTrace | None) -> None:
        send = (_ToolCallingSend(request, self._frames)
                if request.tools and request.tool_choice != "none" else self.send)
        try:
            await self._generations.run(principal, request, send, self._peer, trace)
        except asyncio.CancelledError:
            if request.request_id not in self._tasks:
                raise  # the stream is being torn down
            # A Cancel frame: the pipeline has reported `cancelled`; the stream goes on.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            self._tasks.pop(request.request_id, None)
            self._wake()

    async def frames(self):
        """Frames for the client until input is done and every generation has finished; a
        Heartbeat after `heartbeat_interval_s` without one. One queue carries frames and
        wake-ups, so waiting costs no task per frame (docs/benchmarks.md, the gateway's own
        cost)."""
        interval = self._settings.heartbeat_interval_s
        while True:
            if self.failure is not None:
                return
            if not self._frames.empty():  # the common case while tokens flow: no waiting
                frame = self._frames.get_nowait()
                if frame is not None:
                    yield frame
                continue
            if not self._tasks and (
                self._input_done.is_set() or self._draining.is_set() or self._too_old()
            ):
                return
            try:
                async with asyncio.timeout(interval):
                    frame = await self._frames.get()
            except TimeoutError:
                yield inference_pb2.ServerFrame(heartbeat=inference_pb2.Heartbeat())
                continue
            if frame is not None:
                yield frame

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


async def setup(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings
    assert isinstance(settings, GatewaySettings)
    keys = etcd.WatchCache(ctx.etcd, etcd.Keys.apikeys, parse_key)
    tenants = etcd.WatchCache(ctx.etcd, etcd.Keys.tenants, parse_tenant)
    catalog = ModelCatalog()
    directory = ServiceDirectory(ctx.etcd, ctx.tls, ctx.settings.mesh_token.get_secret_value())
    tokenizers = TokenizerStore(
        await asyncio.to_thread(BlobCache, settings.blob_cache_dir, settings.blob_cache_max_bytes,
                                mesh_download(directory, settings.peer_timeout_s)),
        cache_root())

    def models_changed() -> None:
        catalog.rebuild(models.items)
        tokenizers.refresh(v for entry in catalog.models() for v in entry.versions.values())

    models: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
        ctx.etcd, etcd.Keys.models, etcd.parse_models_key, on_change=models_changed
    )
    served = ServedModels(ctx.etcd)
    loads = LoadReports(ctx.etcd)  # for routing on its own when no scheduler answers
    for cache in (directory, keys, tenants, models, served, loads):
        await cache.start()
    audit = await AuditEmitter.open(directory, AuditSpoolSettings(), settings.instance_id,
                                    settings.peer_timeout_s)
    adapter = TritonAdapter(ctx.tls)
    shadow_schedulers = SchedulerClient(directory, settings.peer_timeout_s, settings.zone)
    shadow = ShadowTraffic(shadow_schedulers, adapter, settings.shadow_max_in_flight,
                           settings.shadow_timeout_s)
    schedulers = SchedulerClient(directory, min(settings.peer_timeout_s,
                                                settings.scheduler_budget_s / 2), settings.zone)
    quota = QuotaLeases(tenants, directory, settings.instance_id, settings.peer_timeout_s,
                        settings.quota_fail_open)
    quota.start()
    pipeline = GenerationPipeline(
        catalog,
        audit.guard(quota),
        ResilientRouting(
            schedulers,
            FallbackRouter(FallbackConfig(budget_s=settings.scheduler_budget_s,
                                          retry_s=settings.fallback_retry_s), settings.zone),
            served.records, lambda: loads.items),
        adapter,
        audit,
        Limits(default_timeout_s=settings.default_timeout_s, max_timeout_s=settings.max_timeout_s),
        FairAdmission(AdmissionLimits(
            max_running=settings.max_running, max_queued_per_tenant=settings.max_queued_per_tenant,
            max_queued=settings.max_queued, aging_s=settings.queue_aging_s,
            max_wait_s=settings.max_queue_wait_s)),
        shadow=shadow,
        tokenizers=tokenizers,
        source=f"gateway/{settings.instance_id}",
        zone=settings.zone,
        max_attempts=settings.max_attempts,
        failover=FailoverSettings(settings.failover_max_moves, settings.failover_stall_s,
                                  settings.failover_first_chunk_s),
        serving=served.served,
        prompt_workers=settings.prompt_workers,
        response_cache=ResponseCache(
            settings.response_cache_ttl_s,
            max_tenant_bytes=settings.response_cache_max_tenant_bytes,
            max_bytes=settings.response_cache_max_bytes),
    )
    authenticator = Authenticator(keys, tenants)
    generations = Generations(pipeline, IdempotencyCache(settings.idempotency_ttl_s),
                              settings.max_choices)
    add_servicer(  # as add_InferenceServicer_to_server, a malformed frame → INVALID_ARGUMENT
        ctx.server, InferenceServicer(authenticator, catalog, generations, settings, ctx.draining),
        inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    )
    # The OpenAI-compatible front: the same generations, served over HTTP in this loop.
    http = HttpServer(
        OpenAIFront(authenticator, catalog, generations, ctx.draining,
                    settings.heartbeat_interval_s, settings.stream_buffer_frames,
                    settings.max_body_bytes).app(),
        settings.host, settings.http_port, settings.tls,
    )
    add_servicer(  # as add_TenantAdminServicer_to_server, a malformed frame → INVALID_ARGUMENT
        ctx.server,
        TenantAdminServicer(authenticator, TenantStore(ctx.etcd), directory,
                            settings.peer_timeout_s, audit, f"gateway/{settings.instance_id}"),
        tenants_pb2.DESCRIPTOR.services_by_name["TenantAdmin"],
    )

    await http.start()

    async def cleanup() -> None:
        await http.stop()
        await pipeline.drain_background()
        await tokenizers.close()
        await shadow.close()
        # The releases queued by the generations drained above reach their schedulers before
        # the directory closes the channels.
        await asyncio.gather(schedulers.close(), shadow_schedulers.close())
        await quota.close()
        await audit.close()
        await adapter.close()
        await directory.close()
        for cache in (keys, tenants, models, served, loads):
            await cache.stop()

    return ServiceParts(
        [inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
         tenants_pb2.DESCRIPTOR.services_by_name["TenantAdmin"].full_name],
        cleanup=cleanup,
    )
