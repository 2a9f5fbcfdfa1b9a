"""Shadow traffic: copies of sampled requests sent to a model's shadow version, off the user's
path.

A copy starts only after the user's own generation has finished well (so it never delays that
generation, and a gateway shedding load or failing adds no shadow work), it takes no quota slot
and is never billed or audited as the tenant's usage, and its text goes nowhere: only metrics
per version (outcome, TTFT, tokens) come out of it. It runs at the lowest priority the gateway
has: at most `max_in_flight` copies at once, a copy that finds no room is dropped rather than
queued, it is never retried, and its deadline is short.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry.trace import SpanContext
from prometheus_client import Counter, Histogram

from backends.triton.adapter import EngineRequest
from services.common import errors, telemetry
from services.common.logs import get_logger
from services.registry.manifest import ModelVersion

if TYPE_CHECKING:
    from services.gateway.pipeline import Engine, Routing

log = get_logger(__name__)
SHADOW_GENERATIONS = Counter(
    "infermesh_gateway_shadow_generations_total",
    "Shadow copies by outcome: ok, error, deadline, dropped_busy, dropped_invalid.",
    ["model", "version", "outcome"],
)
SHADOW_TTFT = Histogram(
    "infermesh_gateway_shadow_ttft_seconds", "Shadow copy start to its first token.",
    ["model", "version"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SHADOW_TOKENS = Counter(
    "infermesh_gateway_shadow_tokens_total", "Tokens the shadow versions produced (not billed).",
    ["model", "version", "kind"],
)


class ShadowTraffic:
    def __init__(
        self, routing: Routing, engine: Engine, max_in_flight: int,
        timeout_s: float, clock: Callable[[], float] = time.monotonic,
    ):
        self._routing = routing
        self._engine = engine
        self._max_in_flight = max_in_flight
        self._timeout_s = timeout_s
        self._clock = clock
        self._running: set[asyncio.Task[None]] = set()

    def submit(self, version: ModelVersion, request: EngineRequest) -> bool:
        """Starts a copy of `request` on `version` if there is room; never blocks."""
        if len(self._running) >= self._max_in_flight:
            self.drop(version, "dropped_busy")
            return False
        copy = dataclasses.replace(request, request_id=f"{request.request_id}.shadow")
        # A trace of its own, linked to the user's generation (not a child of it: it starts
        # after that one ended).
        origin = telemetry.current_context()
        task = asyncio.create_task(self._run(version, copy, origin),
                                   name=f"shadow {copy.request_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    @staticmethod
    def drop(version: ModelVersion, outcome: str) -> None:
        SHADOW_GENERATIONS.labels(version.name, version.version_id, outcome).inc()

    async def _run(self, version: ModelVersion, request: EngineRequest,
                   origin: SpanContext | None = None) -> None:
        with telemetry.linked_span(f"shadow {version.name}", origin, {
                "gen_ai.request.model": version.name, "infermesh.model.version": version.version_id,
                "infermesh.request_id": request.request_id}):
            await self._copy(version, request)

    async def _copy(self, version: ModelVersion, request: EngineRequest) -> None:
        started = self._clock()
        outcome = "ok"
        prompt_tokens = completion_tokens = 0
        first_token = False
        try:
            async with asyncio.timeout(self._timeout_s):
                route = await self._routing.route(
                    request.triton_model_name, version.version_id, request.request_id,
                    self._timeout_s + 5.0, [],
                )
                try:
                    async for chunk in self._engine.generate(route.grpc_endpoint, request):
                        prompt_tokens = chunk.prompt_tokens or prompt_tokens
                        completion_tokens = chunk.completion_tokens or completion_tokens
                        if chunk.text and not first_token:
                            first_token = True
                            SHADOW_TTFT.labels(version.name, version.version_id).observe(
                                self._clock() - started)
                finally:
                    with contextlib.suppress(Exception):
                        await self._routing.release_route(route.reservation_id)
        except TimeoutError:
            outcome = "deadline"
        except errors.MeshError as exc:
            outcome = "error"
            log.info("shadow_failed", version=version.version_id, code=exc.code,
                     error=exc.message)
        SHADOW_GENERATIONS.labels(version.name, version.version_id, outcome).inc()
        SHADOW_TOKENS.labels(version.name, version.version_id, "prompt").inc(prompt_tokens)
        SHADOW_TOKENS.labels(version.name, version.version_id, "completion").inc(completion_tokens)

    async def close(self) -> None:
        """Cancels the copies still running (they matter to no one)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=5.0)
