"""The Scheduler gRPC servicer: replicas and their load reports from the sidecars' leased etcd
records (two watch caches), routing by `Router`, released outcomes to the breakers and to the
demand meter (`on_release`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable

from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge, Histogram

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import errors, etcd, status, telemetry
from services.common.frames import add_servicer
from services.common.kv_blocks import MAX_BLOCKS as MAX_KV_BLOCKS
from services.common.logs import get_logger
from services.common.prefix import MAX_BLOCKS
from services.common.runtime import ServiceContext, ServiceParts
from services.scheduler.breakers import BreakerState
from services.scheduler.candidates import RouteQuery
from services.scheduler.inventory import LoadReport, ReplicaInfo
from services.scheduler.kv_feed import KvFeeds
from services.scheduler.outcome import Outcome
from services.scheduler.placement_loop import PlacementSettings, start_placement
from services.scheduler.routing import Policy, Router
from services.scheduler.settings import SchedulerSettings

log = get_logger(__name__)

ROUTES = Counter("infermesh_scheduler_routes_total", "Route decisions.", ["model", "outcome"])
DECISION = Histogram(
    "infermesh_scheduler_route_decision_seconds", "Time to pick a replica (in process).",
    ["policy"], buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01),
)
RELEASES = Counter(
    "infermesh_scheduler_releases_total", "Released routes, by reported outcome.",
    ["model", "outcome"],
)
REPLICAS = Gauge("infermesh_scheduler_replicas", "Replicas known, by health.", ["healthy"])
MAX_EXCLUDED = 64
MAX_MODEL_CHARS = 128  # a Triton model name's limit
MAX_ZONE_CHARS = 64
MAX_PROMPT_TOKENS = 10_000_000
MAX_COMPLETION_TOKENS = 10_000_000
MAX_KV_BLOCK_TOKENS = 65_536
MAX_STREAM_CALLS = 4096  # routes, and releases, in one RouteStream message
# Calls handled between yields to the loop: ~5 ms of routing, so a long message never holds up
# etcd lease keep-alives or other gateways' streams for long.
CALLS_BETWEEN_YIELDS = 64

OUTCOMES = {
    scheduler_pb2.ROUTE_OUTCOME_UNSPECIFIED: Outcome.UNREPORTED,
    scheduler_pb2.ROUTE_OUTCOME_OK: Outcome.OK,
    scheduler_pb2.ROUTE_OUTCOME_FAILED_BEFORE_FIRST_TOKEN: Outcome.FAILED_BEFORE_FIRST_TOKEN,
    scheduler_pb2.ROUTE_OUTCOME_FAILED_AFTER_FIRST_TOKEN: Outcome.FAILED_AFTER_FIRST_TOKEN,
    scheduler_pb2.ROUTE_OUTCOME_CANCELLED: Outcome.CANCELLED,
}
BREAKER_STATES = {
    BreakerState.CLOSED: scheduler_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: scheduler_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: scheduler_pb2.BREAKER_STATE_HALF_OPEN,
}

OnRelease = Callable[[str, int, int], None]  # (triton model, prompt tokens, completion tokens)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, replicas: etcd.WatchCache[ReplicaInfo], loads: etcd.WatchCache[LoadReport],
        router: Router, *, max_hold_s: float, on_release: OnRelease | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._replicas = replicas
        self._loads = loads
        self._router = router
        self._max_hold_s = max_hold_s
        self._on_release = on_release
        self._clock = clock

    async def Route(self, request, context):
        try:
            return self._route(request)
        except errors.MeshError as exc:
            await status.abort(context, exc)

    async def Release(self, request, context):
        try:
            return scheduler_pb2.ReleaseRouteResponse(released=self._release(request))
        except errors.MeshError as exc:
            await status.abort(context, exc)

    async def RouteStream(self, request_iterator, context):
        """Each message's releases (first: they free places), then its routes, answered by one
        message; a malformed message ends the stream with INVALID_ARGUMENT naming the field."""
        async for message in request_iterator:
            try:
                if len(message.routes) > MAX_STREAM_CALLS:
                    raise errors.InvalidArgument("routes", f"at most {MAX_STREAM_CALLS} a message")
                if len(message.releases) > MAX_STREAM_CALLS:
                    raise errors.InvalidArgument("releases",
                                                 f"at most {MAX_STREAM_CALLS} a message")
                for index, release in enumerate(message.releases):
                    self._release(release, field=f"releases[{index}].")
                    if index % CALLS_BETWEEN_YIELDS == CALLS_BETWEEN_YIELDS - 1:
                        await asyncio.sleep(0)
            except errors.MeshError as exc:
                await status.abort_stream(context, exc, request_iterator)
            if message.routes:
                results = []
                for index, call in enumerate(message.routes):
                    results.append(self._stream_result(call))
                    if index % CALLS_BETWEEN_YIELDS == CALLS_BETWEEN_YIELDS - 1:
                        await asyncio.sleep(0)
                yield scheduler_pb2.RouteStreamResponse(results=results)

    def _stream_result(self, call: scheduler_pb2.RouteCall) -> scheduler_pb2.RouteResult:
        try:
            return scheduler_pb2.RouteResult(call_id=call.call_id, route=self._route(call.route))
        except errors.MeshError as exc:
            return scheduler_pb2.RouteResult(call_id=call.call_id, error=status.to_error(exc))

    def _route(self, request: scheduler_pb2.RouteRequest) -> scheduler_pb2.RouteResponse:
        """One decision and its reservation; a refusal is raised (and counted). A child span of
        the generation's route span when its `traceparent` is set and tracing is on."""
        if not request.traceparent or not telemetry.enabled():
            return self._decide(request)
        with telemetry.span_from(
                request.traceparent, "scheduler route", SpanKind.SERVER,
                {"infermesh.triton_model": request.triton_model_name[:MAX_MODEL_CHARS],
                 "infermesh.routing.policy": self._router.config.policy.value}) as span:
            try:
                reply = self._decide(request)
            except errors.MeshError as exc:
                telemetry.set_error(span, exc.code, exc.message)
                raise
            if span is not None and span.is_recording():  # sampled: the line joins the trace
                log.info("route_decided", request_id=request.request_id[:128],
                         replica=reply.replica_id, reservation=reply.reservation_id)
            return reply

    def _decide(self, request: scheduler_pb2.RouteRequest) -> scheduler_pb2.RouteResponse:
        model = request.triton_model_name
        try:
            query = self._query(request)
            started = time.perf_counter()
            reservation = self._router.route(
                query, self._replicas.items.values(), self._loads.items, self._clock())
            DECISION.labels(self._router.config.policy.value).observe(
                time.perf_counter() - started)
        except errors.MeshError as exc:
            ROUTES.labels(model[:64], exc.code).inc()
            if isinstance(exc, errors.Unavailable) and self._on_release is not None and not any(
                    model in replica.models for replica in self._replicas.items.values()):
                # Demand without tokens: placement loads a version that clients ask for by its
                # id and that no replica serves yet (the client retries after the delay).
                self._on_release(model, 0, 0)
            raise
        ROUTES.labels(model, "OK").inc()
        span = telemetry.current()
        if span is not None:
            span.set_attribute("infermesh.replica_id", reservation.replica.replica_id)
            if reservation.score is not None:
                span.set_attribute("infermesh.routing.score", reservation.score)
        return scheduler_pb2.RouteResponse(
            replica_id=reservation.replica.replica_id,
            grpc_endpoint=reservation.replica.grpc_endpoint,
            reservation_id=reservation.reservation_id,
        )

    def _query(self, request: scheduler_pb2.RouteRequest) -> RouteQuery:
        hold_s = request.hold.ToTimedelta().total_seconds()
        if not 0 < len(request.triton_model_name) <= MAX_MODEL_CHARS:
            raise errors.InvalidArgument("triton_model_name",
                                         f"is required, at most {MAX_MODEL_CHARS} characters")
        if not 0 < hold_s <= self._max_hold_s:
            raise errors.InvalidArgument("hold", f"must be in (0, {self._max_hold_s:.0f}] seconds")
        if len(request.prefix_hashes) > MAX_BLOCKS:
            raise errors.InvalidArgument("prefix_hashes", f"at most {MAX_BLOCKS} blocks")
        if len(request.kv_block_hashes) > MAX_KV_BLOCKS:
            raise errors.InvalidArgument("kv_block_hashes", f"at most {MAX_KV_BLOCKS} blocks")
        if request.kv_block_tokens > MAX_KV_BLOCK_TOKENS or (
                request.kv_block_hashes and not request.kv_block_tokens):
            raise errors.InvalidArgument(
                "kv_block_tokens", f"must be in [1, {MAX_KV_BLOCK_TOKENS}] with kv_block_hashes")
        if len(request.exclude_replicas) > MAX_EXCLUDED:
            raise errors.InvalidArgument("exclude_replicas", f"at most {MAX_EXCLUDED} replicas")
        if len(request.zone) > MAX_ZONE_CHARS:
            raise errors.InvalidArgument("zone", f"at most {MAX_ZONE_CHARS} characters")
        if request.prompt_tokens > MAX_PROMPT_TOKENS:
            raise errors.InvalidArgument("prompt_tokens", f"at most {MAX_PROMPT_TOKENS}")
        return RouteQuery(
            model=request.triton_model_name, hold_s=hold_s, prompt_tokens=request.prompt_tokens,
            prefix_hashes=request.prefix_hashes, zone=request.zone,
            exclude=frozenset(request.exclude_replicas),
            kv_block_hashes=request.kv_block_hashes, kv_block_tokens=request.kv_block_tokens,
        )

    def _release(self, request: scheduler_pb2.ReleaseRouteRequest, field: str = "") -> bool:
        """Frees the reservation and feeds its outcome to the breakers and the demand meter;
        False when it is unknown or already expired. `field`: where the request sits in the
        caller's message, for the errors' field names."""
        outcome = OUTCOMES.get(request.outcome)
        if outcome is None:
            raise errors.InvalidArgument(f"{field}outcome", f"unknown value {request.outcome}")
        if request.completion_tokens > MAX_COMPLETION_TOKENS:  # it drives the demand signal
            raise errors.InvalidArgument(f"{field}completion_tokens",
                                         f"must be at most {MAX_COMPLETION_TOKENS}")
        reservation = self._router.release(
            request.reservation_id, outcome, self._clock(), self._replicas.items.values())
        if reservation is None:
            return False
        RELEASES.labels(reservation.model, outcome.value).inc()
        # A request that failed before its first token is retried elsewhere: count it once.
        if self._on_release is not None and outcome is not Outcome.FAILED_BEFORE_FIRST_TOKEN:
            try:
                self._on_release(reservation.model, reservation.prompt_tokens,
                                 request.completion_tokens)
            except Exception as exc:  # demand is advisory: never fail a release for it
                log.error("on_release_failed", model=reservation.model, error=repr(exc))
        return True

    async def ListReplicas(self, request, context):
        now = self._clock()
        in_flight = self._router.in_flight()
        breakers = self._router.breakers
        stale_after_s = self._router.config.load_stale_after_s
        unroutable = self._router.unroutable(self._replicas.items.values(), self._loads.items, now)
        replicas = []
        for r in sorted(self._replicas.items.values(), key=lambda r: r.replica_id):
            report = self._loads.get(r.replica_id)
            age_s = now - report.received_at if report is not None else 0.0
            replicas.append(scheduler_pb2.Replica(
                replica_id=r.replica_id, grpc_endpoint=r.grpc_endpoint,
                metrics_endpoint=r.metrics_endpoint, zone=r.zone, models=sorted(r.models),
                healthy=r.healthy, in_flight=in_flight.get(r.replica_id, 0),
                draining=r.draining, gpu_type=r.gpu_type, gpu_memory_mib=r.gpu_memory_mib or 0,
                loads=[
                    scheduler_pb2.ModelLoad(
                        triton_model=name, kv_max_blocks=load.kv_max_blocks or 0,
                        kv_free_blocks=load.kv_free_blocks or 0,
                        kv_used_blocks=load.kv_used_blocks or 0,
                        kv_reused_blocks=load.kv_reused_blocks or 0, active=load.active or 0,
                        waiting=load.waiting or 0, max=load.max or 0,
                    )
                    for name, load in sorted(report.models.items())
                ] if report is not None else [],
                load_reported=report is not None, load_age_s=age_s,
                load_fresh=report is not None and age_s <= stale_after_s,
                breaker=BREAKER_STATES[breakers.state(r.replica_id)],
                zone_breaker=BREAKER_STATES[breakers.zone_state(r.zone)],
                unroutable_because=unroutable.get(r.replica_id, ""),
                kv_views=self._kv_views(r, now),
            ))
        return scheduler_pb2.ListReplicasResponse(replicas=replicas)


    def _kv_views(self, replica: ReplicaInfo, now: float) -> list[scheduler_pb2.KvCacheView]:
        views = []
        for model in sorted(replica.models):
            view = self._router.kv.views.get((replica.replica_id, model))
            live = view is not None and view.live
            views.append(scheduler_pb2.KvCacheView(
                triton_model=model, source="events" if live else "approximate",
                blocks=view.blocks if view is not None else 0,
                lag_s=view.lag_s if view is not None else 0.0,
                age_s=now - view.applied_at if view is not None else 0.0))
        return views


def replica_parser(_suffix: str, raw: bytes) -> ReplicaInfo:
    return ReplicaInfo.from_record(etcd.decode(raw))


def load_parser(clock: Callable[[], float]) -> Callable[[str, bytes], LoadReport]:
    """Parses a load report, stamped with when it arrived (freshness is judged on our clock).
    The watch cache parses each write once, so a re-list after a reconnect keeps the stamp: a
    replica whose reports stopped does not look fresh again."""
    def parse(suffix: str, raw: bytes) -> LoadReport:
        record = etcd.decode(raw)
        if not isinstance(record, dict):
            raise ValueError("a load report is a JSON object")
        return LoadReport.from_record(suffix, record, clock())
    return parse


async def setup(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings
    assert isinstance(settings, SchedulerSettings)
    router = Router(settings.routing_config())
    log.info("routing", policy=router.config.policy.value)
    # Under `precise` (the only policy that reads them) every scheduler follows every replica's
    # KV events, so instances hold the same view; under any other policy none are followed.
    feeds = KvFeeds(router.kv, ctx.tls, settings.mesh_token.get_secret_value())

    def replicas_changed() -> None:
        _count_replicas(replicas)
        if router.config.policy is Policy.PRECISE:
            feeds.follow(replicas.items.values())

    replicas: etcd.WatchCache[ReplicaInfo] = etcd.WatchCache(
        ctx.etcd, etcd.Keys.replicas, replica_parser, on_change=replicas_changed)
    loads: etcd.WatchCache[LoadReport] = etcd.WatchCache(
        ctx.etcd, etcd.Keys.replica_load, load_parser(time.monotonic))
    placement_settings = PlacementSettings()
    meter = placement_settings.demand_meter()
    async with contextlib.AsyncExitStack() as starting:  # a failed start undoes what it did
        starting.push_async_callback(feeds.close)
        await replicas.start()
        starting.push_async_callback(replicas.stop)
        await loads.start()
        starting.push_async_callback(loads.stop)
        # The election and placement (only the leader places; any instance routes); on
        # shutdown it steps down first, so another instance leads at once.
        starting.push_async_callback(await start_placement(ctx, meter, placement_settings))
        running = starting.pop_all()
    # Start-up objects (modules, protobuf descriptors, the loaded caches) never die: out of the
    # collector's sight, full collections stay short on the routing path (bench/route_decision.py).
    gc.collect()
    gc.freeze()
    add_servicer(  # a malformed frame → INVALID_ARGUMENT, never UNKNOWN
        ctx.server, SchedulerServicer(replicas, loads, router, max_hold_s=settings.max_hold_s,
                          on_release=meter.on_release),
        scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"], refuse_malformed=True,
    )

    return ServiceParts(
        [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name], cleanup=running.aclose
    )


def _count_replicas(replicas: etcd.WatchCache[ReplicaInfo]) -> None:
    healthy = sum(1 for r in replicas.items.values() if r.healthy)
    REPLICAS.labels("true").set(healthy)
    REPLICAS.labels("false").set(len(replicas.items) - healthy)
