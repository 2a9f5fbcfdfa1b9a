"""One generation, start to finish: the single place for

    resolve → validate → admit → route → relay → finish

that both fronts (gRPC `Generate`/`GenerateStream`, later the OpenAI HTTP API) drive. It knows no
protobuf frames: it reports `Accepted`, `TokenText` and `Finished` events through `send`, and it
always ends with exactly one `Finished` unless its task is cancelled by a stream being torn down.

Cancellation: cancelling the task that runs `run()` (client Cancel frame, disconnect) cancels the
Triton stream, releases the route reservation and the concurrency slot, and reports `cancelled`.
The deadline does the same and reports `deadline`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from backends.triton.adapter import EngineChunk, EngineRequest
from infermesh.v1 import auditor_pb2
from services.auditor.client import new_event
from services.common import errors, telemetry
from services.common.logprobs import TokenLogprob
from services.common.logs import get_logger
from services.common.outcome import Outcome
from services.common.prefix import prompt_block_hashes
from services.gateway.admission import FairAdmission, priority_index
from services.gateway.failover import Continuation, FailoverSettings, seeded_to_move
from services.gateway.model_access import check_access
from services.gateway.peers import Grant, Route
from services.gateway.requests import GenerationRequest, Principal
from services.gateway.response_cache import (
    CachedResponse,
    ResponseCache,
    deterministic,
    request_digest,
)
from services.gateway.safety import StreamFilter
from services.gateway.shadow import ShadowTraffic
from services.gateway.tokenizers import TokenizerStore
from services.gateway.validation import (
    OFFLOAD_MIN_CHARS,
    Limits,
    ValidatedGeneration,
    check_parameters,
    finish_validation,
    input_chars,
    kv_block_tokens,
    prepare_prompt,
    validate,
)
from services.registry.catalog import ModelCatalog
from services.registry.engine_capabilities import capabilities_of
from services.registry.manifest import ModelVersion

log = get_logger(__name__)
CANCEL_REPORT_TIMEOUT_S = 1.0

# `zone` is the gateway's own (its setting): the SLIs are sliced by the zone that served.
GENERATIONS = Counter(
    "infermesh_gateway_generations_total", "Generations finished, by outcome.",
    ["tenant", "model", "version", "finish_reason", "code", "zone"],
)
TTFT = Histogram(
    "infermesh_gateway_ttft_seconds", "Arrival to first token.", ["model", "version", "zone"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ITL = Histogram(  # the ITL SLO's metric (deploy/monitoring/slo.toml); aiperf's definition
    "infermesh_gateway_itl_seconds", "Mean gap between tokens after the first, per generation.",
    ["model", "version", "zone"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
)
SPEND = Counter(  # the cost-per-1k-tokens SLI and per-tenant spend, in the manifests' currency
    "infermesh_gateway_spend_total",
    "What the tokens served cost at the version's prices (cost_per_1k_input/output_tokens).",
    ["tenant", "model", "version"],
)
QUEUE = Histogram(
    "infermesh_gateway_queue_seconds", "Arrival to the engine request (admission + routing).",
    ["model"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
TOKENS = Counter(  # by version too: the canary judge compares cost per 1k tokens per version
    "infermesh_gateway_tokens_total", "Tokens served.", ["tenant", "model", "version", "kind"]
)
COLD_REFUSALS = Counter(
    "infermesh_gateway_cold_version_refusals_total",
    "Requests refused UNAVAILABLE (retry) because no replica served their version yet: it was "
    "being loaded. Not counted as generations.", ["tenant", "model", "version"])
CACHE_HITS = Counter(
    "infermesh_gateway_response_cache_hits_total",
    "Generations answered from the response cache (no engine ran, no tokens were charged).",
    ["tenant", "model"],
)
RESOLUTIONS = Counter(
    "infermesh_gateway_model_resolutions_total",
    "Requests by the rollout arm that answered them: production, canary, previous (production "
    "still loading) or pinned.",
    ["model", "arm"],
)


@functools.lru_cache(maxsize=4096)
def _labelled(metric: MetricWrapperBase, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: prometheus_client checks the values and takes a lock
    on every `labels` call (~5 µs), and a generation makes eight of them."""
    return metric.labels(*values)


@dataclass(frozen=True)
class Accepted:
    request_id: str
    model_version: str


@dataclass(frozen=True)
class TokenText:
    request_id: str
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # when asked for: the tokens this event adds
    index: int = 0  # the choice it belongs to (n > 1: services/gateway/choices.py)


@dataclass(frozen=True)
class ChoiceEnd:
    """How one of several choices ended (n > 1)."""

    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    request_id: str
    finish_reason: str  # stop | length | content_filter | cancelled | deadline | error
    model_version: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    error: errors.MeshError | None = None
    cached: bool = False  # answered from the response cache: no engine ran, no tokens charged
    choices: tuple[ChoiceEnd, ...] = ()  # n > 1: each choice's end, by index
    moves: int = 0  # replicas it moved to mid-stream (services/gateway/failover.py)
    continuation_exact: bool = True  # False: a move could not continue the same draw


Event = Accepted | TokenText | Finished
Send = Callable[[Event], Awaitable[None]]


class Admission(Protocol):
    async def acquire_slot(
        self, tenant: str, request_id: str, input_tokens: int, output_tokens: int
    ) -> Grant: ...
    async def release_slot(
        self, tenant: str, slot_id: str, input_used: int, output_used: int
    ) -> None: ...
    async def charge_request(self, tenant: str) -> None: ...


class Routing(Protocol):
    async def route(
        self, triton_model_name: str, version_id: str, request_id: str, hold_s: float,
        exclude: list[str], *, prefix_hashes: Sequence[int] = (), prompt_tokens: int = 0,
        kv_blocks: tuple[Sequence[int], int] = ((), 0),
    ) -> Route: ...
    async def release_route(
        self, reservation_id: str, outcome: Outcome = Outcome.UNREPORTED,
        completion_tokens: int = 0,
    ) -> None: ...


class Engine(Protocol):
    def generate(self, endpoint: str, request: EngineRequest) -> AsyncIterator[EngineChunk]: ...


class AuditSink(Protocol):
    def emit(self, event: auditor_pb2.AuditEvent) -> None: ...


class TextHashes:
    """sha256 of the prompt the engine got and of the text the client got, for the audit log
    (plan `audit_text_hashes`); the completion's is fed as text is sent."""

    def __init__(self, prompt: str):
        self.prompt_sha256 = hashlib.sha256(prompt.encode()).hexdigest()
        self._completion = hashlib.sha256()

    def sent(self, text: str) -> None:
        self._completion.update(text.encode())

    @property
    def completion_sha256(self) -> str:
        return self._completion.hexdigest()


class _FirstChunkLate(errors.Unavailable):
    """A continuation's replica sent no first chunk in `first_chunk_s`: moved on, not judged."""


@dataclass
class _Release:
    """One attempt's reservation, and how the attempt went (reported when it is released)."""

    reservation_id: str
    outcome: Outcome = Outcome.CANCELLED
    # What the attempt generated (the scheduler's demand metering); None: as far as it got
    completion_tokens: int | None = None


@dataclass
class _Relayed:
    """What the client has not been sent yet, carried across a move: the text the safety filter
    holds and the log probabilities of the tokens behind it."""

    safety: StreamFilter
    held: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Progress:
    """What the generation has got so far; read when it ends, however it ends."""

    arrived: float
    model: str = ""
    version_id: str = ""
    replica_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    first_token_sent: bool = False
    blocked_phrases: tuple[str, ...] = ()  # the version's safety policy
    prices_per_1k: tuple[float, float] = (0.0, 0.0)  # the version's input and output prices
    text_hashes: TextHashes | None = None  # only when the tenant's plan asks for them
    cold: bool = False  # pinned to a version in no serving role that no replica serves yet
    cached: bool = False  # answered from the response cache
    continuation: Continuation | None = None  # what mid-stream failover needs, once validated
    shortened: bool = False  # the quota grant lowered max_tokens (the plan's degraded cap)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _client_request_id(request: GenerationRequest) -> str:
    """The id the client sent: a choice's (n > 1) runs under an id of its own."""
    return request.choice.request_id if request.choice is not None else request.request_id


def _answers_in_full(progress: _Progress) -> bool:
    """Whether a finished generation is the answer to the request as asked, so the response
    cache may keep it under the request's key: not cut short by a degraded grant's max_tokens,
    and not a sampled draw that moved replicas and could not continue the same draw."""
    continuation = progress.continuation
    return not progress.shortened and (continuation is None or continuation.exact)


class GenerationPipeline:
    def __init__(
        self,
        catalog: ModelCatalog,
        admission: Admission,
        routing: Routing,
        engine: Engine,
        audit: AuditSink,
        limits: Limits,
        fair: FairAdmission,
        *,
        shadow: ShadowTraffic,
        tokenizers: TokenizerStore,
        source: str,
        zone: str = "",
        max_attempts: int = 2,
        failover: FailoverSettings | None = None,
        serving: Callable[[str], bool] = lambda _model: True,
        clock: Callable[[], float] = time.monotonic,
        prompt_workers: int = 4,
        response_cache: ResponseCache | None = None,
    ):
        """`serving(triton_model)`: whether some replica serves it now (the rollout sends
        traffic only to loaded versions; see `ModelCatalog.route`)."""
        self._catalog = catalog
        self._serving = serving
        self._admission = admission
        self._routing = routing
        self._engine = engine
        self._audit = audit
        self._limits = limits
        self._fair = fair
        self._shadow = shadow
        self._tokenizers = tokenizers
        self._source = source
        self._zone = zone
        self._max_attempts = max_attempts
        self._failover = failover or FailoverSettings()
        self._clock = clock
        self._response_cache = response_cache
        self._background: set[asyncio.Task[None]] = set()
        # Renders and tokenizes long inputs; its own threads, so audit and etcd I/O in the
        # default executor never wait behind a burst of long prompts.
        self._prompt_executor = concurrent.futures.ThreadPoolExecutor(
            prompt_workers, thread_name_prefix="gateway-prompt")

    async def run(
        self, principal: Principal, request: GenerationRequest, send: Send, client_address: str = ""
    ) -> Finished:
        """Runs one generation, reporting through `send`; returns the `Finished` it sent."""
        # `model` is the resolved name: a client's unknown name never becomes a metric label.
        progress = _Progress(arrived=self._clock())
        finished: Finished | None = None
        shadow: ModelVersion | None = None
        try:
            # A bare name follows the rollout: the sticky canary split, the shadow sample.
            resolution = self._catalog.route(  # the n choices of a request resolve as one
                request.model, principal.tenant_id, request.user, _client_request_id(request),
                self._serving,
            )
            version, shadow = resolution.version, resolution.shadow
            progress.model = version.name
            progress.version_id = version.version_id
            routing = self._catalog.entry(version.name).routing
            # Pinned to a version that is loaded on demand, or still loading as a canary — not
            # production or previous, whose absence is an outage.
            progress.cold = (resolution.arm == "pinned"
                             and version.version_id not in (routing.production, routing.previous)
                             and not self._serving(version.triton_model_name))
            progress.blocked_phrases = version.blocked_phrases
            progress.prices_per_1k = (version.cost_per_1k_input_tokens,
                                      version.cost_per_1k_output_tokens)
            check_access(principal, resolution, self._catalog.entry(version.name).routing)
            _labelled(RESOLUTIONS, version.name, resolution.arm).inc()
            with telemetry.span("validate"):
                validated = await self._validate(request, principal, version)
            if principal.plan.audit_text_hashes:
                progress.text_hashes = TextHashes(validated.engine.prompt)
            digest = self._cache_digest(principal, validated.engine, version.version_id)
            cached = (self._response_cache.get(principal.tenant_id, digest)
                      if self._response_cache is not None and digest else None)
            pieces: list[tuple[str, tuple[TokenLogprob, ...]]] = []

            async def recording(event: Event) -> None:
                if digest and isinstance(event, TokenText):
                    pieces.append((event.text, event.logprobs))
                await send(event)

            async with asyncio.timeout(validated.timeout_s):  # a replay's too: a slow client
                if cached is not None:
                    finish_reason = await self._replay(principal.tenant_id, request.request_id,
                                                       cached, progress, send)
                else:
                    finish_reason = await self._admit_route_relay(
                        principal, validated.engine, version, validated.timeout_s,
                        validated.prompt_tokens, progress, recording,
                        (validated.kv_block_hashes, validated.kv_block_tokens),
                    )
            if cached is None and digest and self._response_cache is not None and (
                    _answers_in_full(progress)):
                self._response_cache.put(principal.tenant_id, digest, CachedResponse(
                    version.version_id, tuple(pieces), finish_reason,
                    progress.prompt_tokens, progress.completion_tokens))
            finished = self._finished(request.request_id, finish_reason, progress)
        except errors.MeshError as exc:
            finished = self._finished(request.request_id, "error", progress, exc)
        except TimeoutError:
            finished = self._finished(
                request.request_id, "deadline", progress,
                errors.DeadlineExceeded("the request's deadline passed"),
            )
        except asyncio.CancelledError:
            finished = self._finished(request.request_id, "cancelled", progress)
            self._audited(principal, request, progress, finished, client_address)
            # Tell the client if it is still there; a torn-down stream reads nothing, so the
            # wait is bounded.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_REPORT_TIMEOUT_S):
                    await send(finished)
            raise
        finally:
            self._run_cleanups(progress)
        self._audited(principal, request, progress, finished, client_address)
        await send(finished)
        if (shadow is not None and finished.finish_reason in ("stop", "length")
                and (request.choice is None or request.choice.index == 0)):  # once a request
            self._copy_to_shadow(principal, request, shadow)
        return finished

    def _audited(
        self, principal: Principal, request: GenerationRequest, progress: _Progress,
        finished: Finished, client_address: str,
    ) -> None:
        """Metrics and the audit hand-off (the audit span: the event is spooled, not sent)."""
        if not telemetry.enabled():
            self._record(principal, request, progress, finished, client_address)
            return
        with telemetry.span("audit"):
            self._record(principal, request, progress, finished, client_address)

    def _cache_digest(self, principal: Principal, engine: EngineRequest, version_id: str) -> str:
        """The response cache's key for a deterministic request of a tenant whose plan turns the
        cache on; "" when the request is not to be cached."""
        if (self._response_cache is None or not principal.plan.response_cache
                or not deterministic(engine.temperature, engine.seed)):
            return ""
        return request_digest(version_id, repr(dataclasses.replace(engine, request_id="")))

    async def _replay(self, tenant: str, request_id: str, cached: CachedResponse,
                      progress: _Progress, send: Send) -> str:
        """A cache hit: the first answer's text as it streamed, under this request's id. It
        counts against the tenant's requests per minute (so identical requests are not a way
        around the rate limit) and takes nothing else: no tokens, no slot, no route, no engine."""
        await self._admission.charge_request(tenant)
        progress.cached = True
        progress.prompt_tokens = cached.prompt_tokens
        progress.completion_tokens = cached.completion_tokens
        progress.queue_s = self._clock() - progress.arrived
        await send(Accepted(request_id, cached.model_version))
        for text, logprobs in cached.pieces:
            await self._send_text(request_id, text, progress, send, logprobs)
        return cached.finish_reason

    async def _validate(
        self, request: GenerationRequest, principal: Principal, version: ModelVersion
    ) -> ValidatedGeneration:
        """The cheap checks first, then rendering and counting: inline for a short input (a
        thread hop costs more than the work), in the bounded prompt executor for a long one so
        a 200 000-character chat never stalls the event loop (docs/decisions.md)."""
        checked = check_parameters(request, principal, version, self._limits)
        tokenizer = self._tokenizers.get(version)
        # The prompt's KV blocks as the engine hashes them, salted as its cache is. Salted with
        # the tenant's own salt even for an engine that takes none: an isolated tenant's route
        # never follows another tenant's blocks (the approximate index's hashes are salted too).
        blocks = (request, self._limits, tokenizer, kv_block_tokens(version),
                  principal.prefix_salt)
        if input_chars(request) < OFFLOAD_MIN_CHARS:
            prompt = prepare_prompt(*blocks)
        else:
            prompt = await asyncio.get_running_loop().run_in_executor(
                self._prompt_executor, prepare_prompt, *blocks)
        return finish_validation(request, version, checked, prompt)

    def _copy_to_shadow(
        self, principal: Principal, request: GenerationRequest, shadow: ModelVersion
    ) -> None:
        """After the user's generation ended well: the same request, checked against the shadow
        version's own limits and defaults, to the shadow (no quota, no audit, text discarded)."""
        try:
            validated = validate(request, principal, shadow, self._limits,
                                 self._tokenizers.get(shadow))
        except (errors.InvalidArgument, errors.Unavailable):  # Unavailable: tokenizer loading
            self._shadow.drop(shadow, "dropped_invalid")
            return
        self._shadow.submit(shadow, validated.engine)

    async def _admit_route_relay(
        self, principal: Principal, engine_request: EngineRequest, version: ModelVersion,
        timeout_s: float, prompt_tokens: int, progress: _Progress, send: Send,
        kv_blocks: tuple[Sequence[int], int] = ((), 0),
    ) -> str:
        version_id = version.version_id
        hold_s = timeout_s + 5.0
        tenant = principal.tenant_id
        # Reserves prompt + max_tokens; settled with the engine's real counts when it ends.
        with telemetry.span("quota"):
            grant = await self._admission.acquire_slot(
                tenant, engine_request.request_id, prompt_tokens, engine_request.max_tokens
            )
        progress.cleanups.append(lambda: self._admission.release_slot(
            tenant, grant.slot_id, progress.prompt_tokens, progress.completion_tokens))
        if grant.max_tokens < engine_request.max_tokens:  # the plan degrades under pressure
            engine_request = dataclasses.replace(engine_request, max_tokens=grant.max_tokens)
            progress.shortened = True
        # Then a fair turn among tenants for one of this gateway's running places.
        with telemetry.span("admission queue"):  # the wait for a running place
            place = await self._fair.admit(
                tenant, priority_index(principal.plan.priority),
                prompt_tokens + engine_request.max_tokens,
                timeout_s - (self._clock() - progress.arrived),
            )

        async def give_back_place() -> None:
            self._fair.release(place, progress.prompt_tokens + progress.completion_tokens)

        progress.cleanups.append(give_back_place)
        failed: list[str] = []
        prefix_hashes = prompt_block_hashes(engine_request.prompt, principal.prefix_salt)
        capabilities = capabilities_of(version.engine_kind)
        engine_request = seeded_to_move(engine_request, self._failover,
                                        capabilities.position_sampling,
                                        capabilities.draws_own_seed)
        progress.continuation = continuation = Continuation(
            engine_request, self._failover, capabilities.position_sampling,
            capabilities.draws_own_seed)
        relayed = _Relayed(StreamFilter(progress.blocked_phrases))
        attempt = 0
        while True:
            attempt += 1

            def route_excluding(exclude: list[str], request: EngineRequest = engine_request
                                ) -> Awaitable[Route]:
                return self._routing.route(
                    request.triton_model_name, version_id, request.request_id, hold_s, exclude,
                    prefix_hashes=prefix_hashes,
                    prompt_tokens=prompt_tokens + len(request.continue_ids), kv_blocks=kv_blocks)

            with telemetry.span("route", SpanKind.CLIENT) as span:  # the scheduler's: a child
                try:
                    route = await route_excluding(failed)
                except errors.Unavailable:
                    if not continuation.stalled:
                        raise
                    # Only a replica that stalled (slow, not gone) can serve it: slow beats an
                    # error.
                    route = await route_excluding(
                        [r for r in failed if r not in continuation.stalled])
                if span is not None:
                    span.set_attribute("infermesh.replica_id", route.replica_id)
            continuation.routed(route.replica_id)
            # Cancelled (or past its deadline) until the relay says otherwise: neither judges
            # the replica, so its breaker ignores them.
            released = _Release(route.reservation_id)

            async def release(r: _Release = released, counted: int = continuation.counted) -> None:
                tokens = r.completion_tokens
                await self._routing.release_route(
                    r.reservation_id, r.outcome,
                    progress.completion_tokens - counted if tokens is None else tokens)

            progress.cleanups.append(release)
            progress.replica_id = route.replica_id
            if attempt == 1:
                progress.queue_s = self._clock() - progress.arrived
                _labelled(QUEUE, progress.model).observe(progress.queue_s)
                await send(Accepted(engine_request.request_id, version_id))
            if not progress.first_token_sent:  # afresh until the client has text
                relayed = _Relayed(StreamFilter(progress.blocked_phrases))
            try:
                if telemetry.enabled():
                    finish_reason = await self._traced_relay(route, engine_request, progress,
                                                             send, relayed)
                else:
                    finish_reason = await self._relay(route, engine_request, progress, send,
                                                      relayed)
            except errors.MeshError as exc:
                # Unavailable is the replica's failure (unreachable, its stream broke, it
                # stalled); any other error is the engine's answer about this request (a prompt
                # that never fits, a bad stop word), which says nothing about the replica's health.
                # A continuation's late first chunk moves it on, but a busy replica (queued,
                # prefilling) is not a broken one: its breaker is not charged.
                replica_failed = isinstance(exc, errors.Unavailable)
                released.outcome = (
                    Outcome.UNREPORTED if not replica_failed or isinstance(exc, _FirstChunkLate)
                    else Outcome.FAILED_AFTER_FIRST_TOKEN if progress.first_token_sent
                    else Outcome.FAILED_BEFORE_FIRST_TOKEN)
                released.completion_tokens = (
                    0 if released.outcome is Outcome.FAILED_BEFORE_FIRST_TOKEN
                    else progress.completion_tokens - continuation.counted)
                if replica_failed and progress.first_token_sent and continuation.may_move():
                    if continuation.remaining <= 0:  # every token arrived, only the end did not
                        return "length"
                    # Mid-stream: on another replica, from the tokens already delivered.
                    log.warning("replica_failed_moving", replica=route.replica_id,
                                at_token=len(continuation.token_ids), error=str(exc))
                    engine_request = continuation.move(route.replica_id)
                elif (not replica_failed or progress.first_token_sent
                        or attempt >= self._max_attempts):
                    raise
                else:  # before the first token: again from the start, on another replica
                    log.warning("replica_failed_retrying", replica=route.replica_id,
                                error=str(exc))
                    continuation.restart()
                failed.append(route.replica_id)
                # Its breaker hears of the failure now, not when the generation ends.
                progress.cleanups.remove(release)
                self._in_background(release)
                continue
            released.outcome = Outcome.OK
            return finish_reason

    async def _traced_relay(
        self, route: Route, engine_request: EngineRequest, progress: _Progress, send: Send,
        relayed: _Relayed,
    ) -> str:
        """`_relay` in the engine span: the first token an event, token counts attributes."""
        with telemetry.span("engine", SpanKind.CLIENT, {
                "server.address": route.grpc_endpoint, "infermesh.replica_id": route.replica_id,
                "gen_ai.request.max_tokens": engine_request.max_tokens}) as span:
            try:
                return await self._relay(route, engine_request, progress, send, relayed)
            finally:
                if span is not None:
                    span.set_attribute("gen_ai.usage.input_tokens", progress.prompt_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", progress.completion_tokens)

    async def _relay(
        self, route: Route, engine_request: EngineRequest, progress: _Progress, send: Send,
        relayed: _Relayed,
    ) -> str:
        """Relays one attempt. A stream that sends nothing for the stall timeout once it
        streams is the replica's failure (Unavailable), as a broken one is."""
        continuation = progress.continuation
        assert continuation is not None
        safety, held = relayed.safety, relayed.held
        continuing = bool(engine_request.continue_ids)
        stall_s, first_chunk_s = self._failover.stall_s, self._failover.first_chunk_s
        loop = asyncio.get_running_loop()
        chunks = self._engine.generate(route.grpc_endpoint, engine_request)
        chunked = False
        async with contextlib.aclosing(chunks):  # leaving early cancels the Triton request
            try:
                # A continuation's timer runs from its start, its first chunk allowed
                # first_chunk_s (it prefills the prompt and the moved tokens, maybe queued): a
                # hung replica costs that, not the request's whole deadline (which still bounds
                # it). A first attempt may queue and prefill for as long as the deadline allows.
                async with asyncio.timeout(first_chunk_s if continuing else None) as stall:
                    async for chunk in chunks:
                        chunked = True
                        stall.reschedule(None)  # a slow client is not a stalled replica
                        if not continuing:  # a continuation's prompt holds the moved tokens
                            progress.prompt_tokens = chunk.prompt_tokens or progress.prompt_tokens
                        if chunk.completion_tokens:
                            progress.completion_tokens = continuation.completion_tokens(chunk)
                        continuation.received(chunk)
                        held.extend(chunk.logprobs)
                        text, blocked = safety.feed(chunk.text)
                        if text:
                            await self._send_text(engine_request.request_id, text, progress,
                                                  send, tuple(held))
                            held.clear()
                        if blocked:
                            return "content_filter"
                        stall.reschedule(loop.time() + stall_s)
            except TimeoutError:
                if not stall.expired():
                    raise
                continuation.stalled.add(route.replica_id)
                if not chunked:
                    raise _FirstChunkLate(
                        f"replica {route.replica_id} sent no first chunk of the moved "
                        f"generation in {first_chunk_s:g}s", retry_after_s=1.0) from None
                raise errors.Unavailable(
                    f"replica {route.replica_id} sent nothing for {stall_s:g}s",
                    retry_after_s=1.0) from None
        await self._send_text(engine_request.request_id, safety.flush(), progress, send,
                              tuple(held))
        if progress.completion_tokens >= continuation.original.max_tokens:
            return "length"
        return "stop"

    async def _send_text(self, request_id: str, text: str, progress: _Progress, send: Send,
                         logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        if not text and not logprobs:
            return
        if not progress.first_token_sent:
            progress.first_token_sent = True
            progress.ttft_s = self._clock() - progress.arrived
            telemetry.add_event("first_token", {"infermesh.ttft_s": progress.ttft_s})
        if progress.text_hashes is not None:
            progress.text_hashes.sent(text)
        await send(TokenText(request_id, text, logprobs))

    def _finished(
        self, request_id: str, reason: str, progress: _Progress,
        error: errors.MeshError | None = None,
    ) -> Finished:
        return Finished(
            request_id=request_id,
            finish_reason=reason,
            model_version=progress.version_id,
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            queue_s=progress.queue_s,
            ttft_s=progress.ttft_s,
            total_s=self._clock() - progress.arrived,
            error=error,
            cached=progress.cached,
            moves=len(progress.continuation.moves) if progress.continuation else 0,
            continuation_exact=progress.continuation.exact if progress.continuation else True,
        )

    def _run_cleanups(self, progress: _Progress) -> None:
        """Releases run in the background: the client's Final need not wait for them."""
        if progress.cleanups:
            self._in_background(*progress.cleanups)
            progress.cleanups.clear()

    def _in_background(self, *cleanups: Callable[[], Awaitable[None]]) -> None:
        """One task runs `cleanups` in order (the local releases come before the scheduler's):
        a task per cleanup cost more than the releases themselves."""
        task = asyncio.create_task(self._quietly(cleanups))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(cleanups: Sequence[Callable[[], Awaitable[None]]]) -> None:
        for cleanup in cleanups:
            try:
                await cleanup()
            except Exception as exc:  # the lease behind it expires anyway
                log.warning("release_failed", error=repr(exc))

    def _record(
        self, principal: Principal, request: GenerationRequest, progress: _Progress,
        finished: Finished, client_address: str,
    ) -> None:
        code = finished.error.code if finished.error else "OK"
        version = progress.version_id or "unresolved"
        model = progress.model or "unknown"
        if progress.cold and code == "UNAVAILABLE" and not progress.first_token_sent:
            # Pinned to a version while it is being loaded (on demand, or a new canary): not a
            # generation that failed — the version's availability and its canary judgement
            # start when it serves. Counted apart; the cold start itself is the sidecar's metric.
            _labelled(COLD_REFUSALS, principal.tenant_id, model, version).inc()
        else:
            _labelled(GENERATIONS, principal.tenant_id, model, version, finished.finish_reason,
                               code, self._zone).inc()
        # The latency SLIs measure serving: a cache hit's replay would flatter the version's.
        served = progress.first_token_sent and not progress.cached
        if served:
            _labelled(TTFT, progress.model, version, self._zone).observe(progress.ttft_s)
        if served and progress.completion_tokens > 1:
            _labelled(ITL, progress.model, version, self._zone).observe(
                (finished.total_s - progress.ttft_s) / (progress.completion_tokens - 1))
        if progress.cached:  # served from the cache: no token generated, nothing spent
            _labelled(CACHE_HITS, principal.tenant_id, model).inc()
        else:
            _labelled(TOKENS, principal.tenant_id, model, version, "prompt").inc(
                progress.prompt_tokens)
            _labelled(TOKENS, principal.tenant_id, model, version, "completion").inc(
                progress.completion_tokens)
            price_in, price_out = progress.prices_per_1k
            _labelled(SPEND, principal.tenant_id, model, version).inc(
                (progress.prompt_tokens * price_in + progress.completion_tokens * price_out)
                / 1000)
        hashes = progress.text_hashes
        generation = auditor_pb2.GenerationRecord(
            tenant=principal.tenant_id,
            key_id=principal.key_id,
            model=request.model,
            model_version=progress.version_id,
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
            finish_reason=finished.finish_reason,
            error_code=code if finished.error else "",
            queue_ms=finished.queue_s * 1000,
            ttft_ms=finished.ttft_s * 1000,
            total_ms=finished.total_s * 1000,
            client_address=client_address,
            idempotency_key=request.idempotency_key,
            replica_id=progress.replica_id,
            prompt_sha256=hashes.prompt_sha256 if hashes else "",
            completion_sha256=hashes.completion_sha256 if hashes else "",
            cached=progress.cached,
            moves=[auditor_pb2.ReplicaMove(from_replica=move.from_replica,
                                           to_replica=move.to_replica,
                                           at_token=move.at_token)
                   for move in (progress.continuation.moves
                                if progress.continuation else ())],
        )
        if request.choice is not None:  # one of n > 1: under the client's id, with its index
            generation.choice_index = request.choice.index
            generation.choice_count = request.choice.count
        self._audit.emit(new_event(self._source, _client_request_id(request),
                                   generation=generation))

    async def drain_background(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        self._prompt_executor.shutdown(wait=False, cancel_futures=True)
