"""The OpenAI-compatible HTTP front: a second front on the same `Generations` (idempotency →
`GenerationPipeline`) the gRPC servicer drives, served by uvicorn in the gateway's event loop.

    POST /v1/chat/completions, /v1/completions   unary JSON, or SSE with "stream": true
    GET  /v1/models, /v1/models/{id}             the registry's catalog
    GET  /openapi.json                           this API, from the pydantic bodies

Every generation runs in its own task; a client that disconnects (unary or streaming) cancels
that task, which is the same path as a gRPC Cancel: the engine frees its slot, quota is settled
with what was really generated. Errors keep OpenAI's JSON shape and the statuses its client maps
to exception classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.common import errors, telemetry
from services.common.auth import Authenticator
from services.common.logprobs import TokenLogprob
from services.common.logs import get_logger
from services.common.tls import TlsMode, TlsSettings, is_loopback
from services.gateway.model_access import model_allowed
from services.gateway.openai_logprobs import chat_logprobs, completion_logprobs
from services.gateway.openai_protocol import (
    ChatCompletionBody,
    CompletionBody,
    openai_param,
    parse_body,
    request_timeout,
    to_generation,
)
from services.gateway.openai_tools import StreamedToolCalls, message_tool_calls
from services.gateway.pipeline import Accepted, ChoiceEnd, Event, Finished, TokenText
from services.gateway.requests import FIELD_LIMITS, GenerationRequest, Principal
from services.gateway.tool_calls import answer_calls
from services.gateway.validation import validate_request_id
from services.registry.catalog import ModelCatalog

log = get_logger(__name__)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CANCEL_WAIT_S = 5.0
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

HTTP_REQUESTS = Counter(
    "infermesh_gateway_http_requests_total", "OpenAI HTTP API requests, by route and status.",
    ["route", "status"],
)
HTTP_DISCONNECTS = Counter(
    "infermesh_gateway_http_disconnects_total",
    "Generations cancelled because the HTTP client went away.", ["route"],
)

# MeshError code → (HTTP status, OpenAI error type).
STATUSES = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "INTERNAL": (500, "server_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}


def error_payload(error: errors.MeshError, body: Any = None) -> dict[str, Any]:
    _, kind = STATUSES[error.code]
    return {"error": {
        "message": error.message,
        "type": kind,
        "param": openai_param(error.field, body) if error.field else None,
        "code": error.reason or error.code.lower(),
    }}


TOO_LARGE = "request_too_large"  # the reason of a body over `max_body_bytes`: HTTP 413


def error_response(
    error: errors.MeshError, request_id: str, body: Any = None
) -> JSONResponse:
    status, _ = STATUSES[error.code]
    if error.reason == TOO_LARGE:
        status = 413
    headers = {"x-request-id": request_id} if request_id else {}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, round(error.retry_after_s * 1000)))
    return JSONResponse(error_payload(error, body), status_code=status, headers=headers)


class _Run:
    """One generation running in its own task, its events queued for the HTTP response."""

    def __init__(self, front: OpenAIFront, principal: Principal, request: Any, peer: str,
                 trace: telemetry.FrontTrace | None):
        self.events: asyncio.Queue[Event] = asyncio.Queue(front.buffer_events)
        self.task = asyncio.create_task(
            front.generations.run(principal, request, self.events.put, peer, trace),
            name=f"http generation {request.request_id}",
        )

    async def next_event(self, disconnected: asyncio.Task[None]) -> Event | None:
        """The next event, or None when the client disconnected first."""
        getter = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        return None

    async def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await asyncio.shield(self.task)


async def _await_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(Response):
    """SSE response: chunks as tokens come (no buffering), a comment when idle, and a watcher
    that cancels the generation as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], run: _Run, headers: dict[str, str],
                 route: str, request_id: str):
        self._chunks = chunks
        self._run = run
        self._route = route
        self._request_id = request_id
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(_await_disconnect(receive))
        # A disconnect cancels the generation at once, even while no token is due.
        watcher.add_done_callback(lambda w: w.cancelled() or self._run.task.cancel())
        completed = False
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for chunk in self._chunks:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                completed = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were writing
            pass
        finally:
            watcher.cancel()
            if completed:  # the pipeline reported Finished; let it return on its own
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    async with asyncio.timeout(CANCEL_WAIT_S):
                        await asyncio.shield(self._run.task)
            else:
                HTTP_DISCONNECTS.labels(self._route).inc()
                log.info("http_client_disconnected", request_id=self._request_id,
                         route=self._route)
                await self._run.cancel()


class OpenAIFront:
    """The routes, over the gateway's own authenticator, catalog and `Generations`."""

    def __init__(self, authenticator: Authenticator, catalog: ModelCatalog, generations: Any,
                 draining: asyncio.Event, heartbeat_interval_s: float, buffer_events: int,
                 max_body_bytes: int = 4 << 20):
        self._max_body_bytes = max_body_bytes
        self._auth = authenticator
        self._catalog = catalog
        self.generations = generations
        self._draining = draining
        self._heartbeat_s = heartbeat_interval_s
        self.buffer_events = buffer_events

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ])

    # -- generations -----------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionBody, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionBody, "completion")

    async def _generate(self, request: Request, body_type: type, route: str) -> Response:
        request_id = request.headers.get("x-request-id", "")
        body = None
        trace = telemetry.front_trace(request.headers.items(), **{
            "http.request.method": "POST", "http.route": request.url.path})
        try:
            request_id = validate_request_id(request_id)
            principal = self._auth.authenticate(request.headers.get("authorization"))
            if trace is not None:
                trace.authenticated()
            if self._draining.is_set():
                raise errors.Unavailable("the gateway is shutting down", retry_after_s=1.0)
            raw = _parse_json(await read_body(request, self._max_body_bytes))
            body = parse_body(body_type, raw)
            generation = to_generation(body, request_id,
                                       request.headers.get("idempotency-key", ""),
                                       request_timeout(request.headers.get("x-request-timeout")))
        except errors.MeshError as exc:
            return self._count(route, error_response(exc, _safe_id(request_id), body))
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        run = _Run(self, principal, generation, peer, trace)
        headers = {"x-request-id": request_id}
        watcher = asyncio.create_task(_await_disconnect(request.receive))
        try:
            # Streaming: the status waits for Accepted (admitted, routed) or an early Finished.
            event = await run.next_event(watcher)
            pieces: dict[int, list[str]] = {}  # by choice
            logprobs: dict[int, list[TokenLogprob]] = {}
            while event is not None and not (
                isinstance(event, Finished) or (body.stream and isinstance(event, Accepted))
            ):
                if isinstance(event, TokenText):
                    pieces.setdefault(event.index, []).append(event.text)
                    logprobs.setdefault(event.index, []).extend(event.logprobs)
                event = await run.next_event(watcher)
        finally:
            watcher.cancel()
        if event is None:
            HTTP_DISCONNECTS.labels(route).inc()
            log.info("http_client_disconnected", request_id=request_id, route=route)
            await run.cancel()
            return self._count(route, Response(status_code=499))
        if isinstance(event, Accepted):
            chunks = _sse_chunks(run, event, body, route, request_id, self._heartbeat_s,
                                 generation.sampling.logprobs, generation)
            return self._count(route, _EventStream(chunks, run, headers, route, request_id))
        assert isinstance(event, Finished)
        if event.error is not None or event.finish_reason in ("cancelled", "deadline"):
            return self._count(route, self._finished_error(event, request_id, body))
        payload = _completion(route, request_id, body, event, {
            end.index: ("".join(pieces.get(end.index, ())),
                        _logprobs(route, generation.sampling.logprobs,
                                  logprobs.get(end.index, ()), 0))
            for end in _ends(event)}, generation)
        return self._count(route, JSONResponse(payload, headers=headers))

    @staticmethod
    def _finished_error(finished: Finished, request_id: str, body: Any) -> JSONResponse:
        error = finished.error or (
            errors.DeadlineExceeded("the request's deadline passed")
            if finished.finish_reason == "deadline" else errors.Cancelled("cancelled"))
        return error_response(error, request_id, body)

    @staticmethod
    def _count(route: str, response: Response) -> Response:
        HTTP_REQUESTS.labels(route, str(response.status_code)).inc()
        return response

    # -- models ----------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        try:
            principal = self._auth.authenticate(request.headers.get("authorization"))
        except errors.MeshError as exc:
            return self._count("models", error_response(exc, ""))
        data = [self._model(entry.name) for entry in self._catalog.models()
                if model_allowed(principal, entry.name)]
        return self._count("models", JSONResponse({"object": "list", "data": data}))

    async def get_model(self, request: Request) -> Response:
        try:
            principal = self._auth.authenticate(request.headers.get("authorization"))
            model_id = request.path_params["model_id"]
            if len(model_id) > FIELD_LIMITS["model"].chars:
                raise errors.InvalidArgument(
                    "model", f"must be at most {FIELD_LIMITS['model'].chars} characters")
            name = model_id.partition("@")[0]
            if not model_allowed(principal, name):
                raise errors.PermissionDenied(
                    f"tenant {principal.tenant_id!r} may not use model {name!r}", field="model")
            version = self._catalog.resolve(model_id)  # NotFound for unknown names and aliases
            payload = self._model(name)
            payload.update(id=model_id, version=version.version_id)
        except errors.MeshError as exc:
            return self._count("models", error_response(exc, ""))
        return self._count("models", JSONResponse(payload))

    def _model(self, name: str) -> dict[str, Any]:
        entry = self._catalog.entry(name)
        routing = entry.routing
        production = entry.versions.get(routing.production)
        aliases = {alias: routing.target(alias)
                   for alias in ("production", "canary", "previous", "shadow")
                   if routing.target(alias)}
        return {
            "id": name, "object": "model", "owned_by": "infermesh",
            "created": int(production.registered_at) if production else 0,
            "version": routing.production, "aliases": aliases,
            "context_window": production.context_window if production else 0,
        }

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or InvalidArgument with reason `request_too_large` (HTTP 413) as soon as it is
    known to exceed `limit`: from Content-Length before reading anything, else while reading,
    so an oversized body is never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise errors.InvalidArgument("Content-Length", "must be a number of bytes")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> errors.InvalidArgument:
    error = errors.InvalidArgument("body", f"must be at most {limit} bytes")
    error.reason = TOO_LARGE
    return error


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep to parse
        raise errors.InvalidArgument("body", "must be a JSON object") from None


def _safe_id(request_id: str) -> str:
    """Echo only an id that passed validation (never reflect arbitrary header bytes)."""
    try:
        return validate_request_id(request_id) if request_id else ""
    except errors.InvalidArgument:
        return ""


def _object_id(route: str, request_id: str) -> str:
    return f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{request_id}"


def _usage(finished: Finished) -> dict[str, Any]:
    """OpenAI's usage; a response-cache hit says every prompt token was cached
    (`prompt_tokens_details.cached_tokens`)."""
    usage: dict[str, Any] = {"prompt_tokens": finished.prompt_tokens,
                             "completion_tokens": finished.completion_tokens,
                             "total_tokens": finished.prompt_tokens + finished.completion_tokens}
    if finished.cached:
        usage["prompt_tokens_details"] = {"cached_tokens": finished.prompt_tokens}
    return usage


def _logprobs(route: str, asked: bool, logprobs: Sequence[TokenLogprob],
              offset: int) -> dict[str, Any] | None:
    """A choice's `logprobs` when the request asked for them, else None."""
    if not asked:
        return None
    return chat_logprobs(logprobs) if route == "chat" else completion_logprobs(logprobs, offset)


def _ends(finished: Finished) -> tuple[ChoiceEnd, ...]:
    """How each choice ended: one for n = 1, `Finished.choices` for more."""
    return finished.choices or (
        ChoiceEnd(0, finished.finish_reason, finished.completion_tokens),)


def _failover(finished: Finished) -> dict[str, Any]:
    """An extension field, only on a generation that moved to another replica mid-stream (the
    gRPC `Final.failover`); OpenAI's objects take extra fields, its clients keep them."""
    if not finished.moves:
        return {}
    return {"infermesh_failover": {"moves": finished.moves,
                                   "continuation_exact": finished.continuation_exact}}


def _completion(route: str, request_id: str, body: Any, finished: Finished,
                outputs: dict[int, tuple[str, dict[str, Any] | None]],
                generation: GenerationRequest | None = None) -> dict[str, Any]:
    """`outputs`: each choice's text and logprobs, by index. A chat answer that calls the
    request's tools is given as `tool_calls`."""
    choices = []
    for end in _ends(finished):
        text, logprobs = outputs[end.index]
        if route == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            finish_reason = end.finish_reason
            calls = (answer_calls(generation.tools, generation.tool_choice, text)
                     if generation is not None else None)
            if calls:
                message.update(content=None, tool_calls=message_tool_calls(
                    calls, _choice_id(request_id, end.index)))
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choices.append({"index": end.index, "finish_reason": finish_reason,
                            "logprobs": logprobs, "message": message})
        else:
            choices.append({"index": end.index, "finish_reason": end.finish_reason,
                            "logprobs": logprobs, "text": text})
    return {
        "id": _object_id(route, request_id),
        "object": "chat.completion" if route == "chat" else "text_completion",
        "created": int(time.time()), "model": body.model,
        "system_fingerprint": finished.model_version,
        "choices": choices, "usage": _usage(finished), **_failover(finished),
    }


def _choice_id(request_id: str, index: int) -> str:
    """What names a choice's tool calls: the request's id, and the choice's index past the
    first."""
    return request_id if index == 0 else f"{request_id}-{index}"


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse_chunks(run: _Run, accepted: Event, body: Any, route: str, request_id: str,
                      heartbeat_s: float, logprobs_asked: bool = False,
                      generation: GenerationRequest | None = None) -> AsyncIterator[bytes]:
    """chunk per token batch → last chunk with finish_reason → [usage chunk] → [DONE]; a
    failure after the first chunk is an `error` event (the status line is already sent)."""
    created = int(time.time())
    version = accepted.model_version if isinstance(accepted, Accepted) else ""
    chat = route == "chat"
    base = {"id": _object_id(route, request_id),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": body.model, "system_fingerprint": version}

    started: set[int] = set()  # choices whose first chunk went out (it names the role)
    offsets: dict[int, int] = {}  # characters of each choice's text so far (text_offset)

    def chunk(index: int, content: str | None, finish_reason: str | None,
              logprobs: Sequence[TokenLogprob] = (),
              extension: dict[str, Any] | None = None) -> bytes:
        offset = offsets.get(index, 0)
        shown = _logprobs(route, logprobs_asked, logprobs, offset) if logprobs else None
        offsets[index] = offset + len(content or "")
        if chat:
            delta: dict[str, Any] = {} if content is None else {"content": content}
            if index not in started:
                delta["role"] = "assistant"
            choice = {"index": index, "delta": delta, "logprobs": shown,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": content or "", "logprobs": shown,
                      "finish_reason": finish_reason}
        started.add(index)
        return _data({**base, "choices": [choice], **(extension or {})})

    def tool_chunk(index: int, calls: list[dict[str, Any]]) -> bytes:
        delta: dict[str, Any] = {"tool_calls": calls}
        if index not in started:
            delta["role"] = "assistant"
        started.add(index)
        return _data({**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                           "finish_reason": None}]})

    calling: dict[int, StreamedToolCalls] = {}  # a chat with tools: each choice's calls

    def calls_of(index: int) -> StreamedToolCalls | None:
        if not chat or generation is None or not generation.tools:
            return None
        if index not in calling:
            calling[index] = StreamedToolCalls(generation, _choice_id(request_id, index))
        return calling[index]

    following: Event | None = None
    while True:
        if following is not None:
            event, following = following, None
        else:
            try:
                async with asyncio.timeout(heartbeat_s):
                    event = await run.events.get()
            except TimeoutError:
                yield HEARTBEAT
                continue
        if isinstance(event, TokenText):
            # Batch what already waits for the same choice: one chunk per token batch, never
            # a wait for more.
            text = [event.text]
            logprobs = list(event.logprobs)
            while following is None and not run.events.empty():
                following = run.events.get_nowait()
                if isinstance(following, TokenText) and following.index == event.index:
                    text.append(following.text)
                    logprobs.extend(following.logprobs)
                    following = None
            streamed = calls_of(event.index)
            if streamed is None:
                yield chunk(event.index, "".join(text), None, logprobs)
                continue
            # A call's text goes out as delta.tool_calls (without logprobs).
            content, calls = streamed.feed("".join(text))
            if calls:
                yield tool_chunk(event.index, calls)
            if content:
                yield chunk(event.index, content, None, logprobs)
            continue
        if not isinstance(event, Finished):
            continue
        if event.error is not None or event.finish_reason in ("cancelled", "deadline"):
            error = event.error or errors.DeadlineExceeded("the request's deadline passed")
            yield _data(error_payload(error, body))
            return
        ends = _ends(event)
        for end in ends:
            finish_reason = end.finish_reason
            streamed = calls_of(end.index)
            if streamed is not None:
                content, calls = streamed.finish()
                if calls:
                    yield tool_chunk(end.index, calls)
                if content:
                    yield chunk(end.index, content, None)
                if streamed.called and finish_reason == "stop":
                    finish_reason = "tool_calls"
            yield chunk(end.index, None, finish_reason,
                        extension=_failover(event) if end is ends[-1] else None)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _data({**base, "choices": [], "usage": _usage(event)})
        yield DONE
        return


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the generation routes, its schemas taken from the pydantic bodies."""
    components: dict[str, Any] = {}
    for model in (ChatCompletionBody, CompletionBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    error = {"description": "OpenAI error shape", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "object"}}}}}}
    responses = {str(code): error for code in (400, 401, 403, 404, 429, 503, 504)}

    headers = [
        {"name": "X-Request-Id", "in": "header", "schema": {"type": "string"},
         "description": "echoed; 1-128 of A-Z a-z 0-9 . _ : -"},
        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
         "description": "a retry with the same key and body returns the first result"},
        {"name": "X-Request-Timeout", "in": "header", "schema": {"type": "string"},
         "description": "the generation's deadline in seconds (504 when it passes)"},
    ]

    def post(name: str) -> dict[str, Any]:
        return {"post": {
            "parameters": headers,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {"200": {"description": "JSON, or SSE with stream=true"}, **responses,
                          "413": {**error, "description": "a body over max_body_bytes"}},
            "security": [{"bearer": []}],
        }}

    model_get = {"get": {"responses": {"200": {"description": "models"}, **responses},
                         "security": [{"bearer": []}]}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "infermesh OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/chat/completions": post("ChatCompletionBody"),
            "/v1/completions": post("CompletionBody"),
            "/v1/models": model_get,
            "/v1/models/{model_id}": {"get": {
                **model_get["get"],
                "parameters": [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}]}},
        },
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
    }


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway's runtime owns the signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """Starts and stops the front's uvicorn server as a task of the running loop."""

    def __init__(self, app: Starlette, host: str, port: int, tls_settings: TlsSettings):
        """Over TLS with the gateway's certificate (clients verify it; API keys authenticate
        them), or in plaintext development on loopback only, as the gRPC listener."""
        certificate = {}
        if tls_settings.mode is TlsMode.MUTUAL:
            certificate = {"ssl_certfile": str(tls_settings.cert_file),
                           "ssl_keyfile": str(tls_settings.key_file)}
        elif not is_loopback(host):
            raise ValueError(f"plaintext development serves HTTP on loopback only, not {host!r}")
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_config=None,
                                access_log=False, timeout_graceful_shutdown=5, **certificate)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="openai http server")
        async with asyncio.timeout(START_TIMEOUT_S):
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # raises why it could not start (port taken, …)
                    raise errors.Internal("the HTTP server stopped while starting")
                await asyncio.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info("openai_http_listening", port=self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self._task
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
