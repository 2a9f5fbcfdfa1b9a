"""What the gateway gets from its peers (quota grants, routes), and its calls to the
scheduler, with deadlines and error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from infermesh.v1 import scheduler_pb2
from services.common import errors, status, telemetry
from services.common.discovery import ServiceDirectory, rendezvous_order
from services.common.logs import get_logger
from services.common.outcome import Outcome
from services.scheduler.client import RouteStream, SchedulerGone

log = get_logger(__name__)
SCHEDULER_FAILOVERS = Counter(
    "infermesh_gateway_scheduler_failovers_total",
    "Routes sent to the next scheduler in rendezvous order because the owner did not answer.")

OUTCOMES = {
    Outcome.UNREPORTED: scheduler_pb2.ROUTE_OUTCOME_UNSPECIFIED,
    Outcome.OK: scheduler_pb2.ROUTE_OUTCOME_OK,
    Outcome.FAILED_BEFORE_FIRST_TOKEN: scheduler_pb2.ROUTE_OUTCOME_FAILED_BEFORE_FIRST_TOKEN,
    Outcome.FAILED_AFTER_FIRST_TOKEN: scheduler_pb2.ROUTE_OUTCOME_FAILED_AFTER_FIRST_TOKEN,
    Outcome.CANCELLED: scheduler_pb2.ROUTE_OUTCOME_CANCELLED,
}


class SchedulersAway(errors.Unavailable):
    """No scheduler instance answered (none registered, or each one tried was down or did not
    answer in time): not a refusal a scheduler sent. The gateway then routes by itself."""


@dataclass(frozen=True)
class Grant:
    """An admitted request's concurrency slot and the output tokens it may generate."""

    slot_id: str
    max_tokens: int


@dataclass(frozen=True)
class Route:
    replica_id: str
    grpc_endpoint: str
    reservation_id: str


class SchedulerClient:
    """The scheduler's Route/Release, from a gateway in `zone` (preferred by the scheduler).

    Reservations, breakers and the prefix index live in each scheduler instance, so a request
    goes to the instance its prompt's first block hashes to (rendezvous: the same prefix, the
    same instance, whichever gateway asks), and its Release to the instance that routed it, both
    on this gateway's one `RouteStream` to that instance. An instance that does not answer is
    skipped for the next one in rendezvous order (where its prefixes move when its registration
    expires), so a lost scheduler fails no request. The stream to an instance that left the
    directory is closed (its releases written first), and releases still due to it are dropped
    (its reservations went with it, or expire with their holds).
    """

    def __init__(self, directory: ServiceDirectory, timeout_s: float, zone: str = ""):
        self._directory = directory
        self._timeout_s = timeout_s
        self._zone = zone
        self._streams: dict[str, RouteStream] = {}  # scheduler endpoint → its route stream
        self._routed_by: dict[str, str] = {}  # reservation id → scheduler endpoint, until released
        self._closing: set[asyncio.Task[None]] = set()  # streams to instances that left

    def _schedulers(self, triton_model_name: str, request_id: str,
                    prefix_hashes: Sequence[int]) -> list[str]:
        """The owner of this prefix first, then the one to fail over to."""
        endpoints = self._live_endpoints()
        if not endpoints:
            raise SchedulersAway("no scheduler service is registered", retry_after_s=1.0)
        key = f"{triton_model_name}/{prefix_hashes[0]}" if prefix_hashes else request_id
        return rendezvous_order(key, endpoints)[:2]

    def _live_endpoints(self) -> list[str]:
        """The registered instances; the streams to those that left are closed."""
        endpoints = self._directory.endpoints("scheduler")
        for endpoint in self._streams.keys() - set(endpoints):
            closing = asyncio.ensure_future(self._streams.pop(endpoint).close(self._timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        return endpoints

    def _stream(self, endpoint: str) -> RouteStream:
        stream = self._streams.get(endpoint)
        if stream is None:
            if endpoint not in self._directory.endpoints("scheduler"):  # left since chosen
                raise SchedulerGone(f"scheduler {endpoint} left the directory", retry_after_s=1.0)
            stream = self._streams[endpoint] = RouteStream(
                self._directory.channel_to(endpoint), self._timeout_s)
        return stream

    async def close(self) -> None:
        """Writes the releases still queued and waits (up to the route timeout) for the results
        the streams owe; before the directory closes their channels."""
        streams = list(self._streams.values())
        self._streams.clear()
        await asyncio.gather(*(stream.close(self._timeout_s) for stream in streams),
                             *self._closing)

    async def route(
        self, triton_model_name: str, version_id: str, request_id: str, hold_s: float,
        exclude: list[str], *, prefix_hashes: Sequence[int] = (), prompt_tokens: int = 0,
        kv_blocks: tuple[Sequence[int], int] = ((), 0),
    ) -> Route:
        """`kv_blocks`: the prompt's KV block hashes and tokens per block (precise routing)."""
        request = scheduler_pb2.RouteRequest(
            triton_model_name=triton_model_name, version_id=version_id, request_id=request_id,
            hold=status.seconds_to_duration(hold_s), exclude_replicas=exclude,
            prefix_hashes=prefix_hashes, prompt_tokens=prompt_tokens, zone=self._zone,
            traceparent=telemetry.traceparent(),  # "" when tracing is off
            kv_block_hashes=kv_blocks[0], kv_block_tokens=kv_blocks[1],
        )
        *first, last = self._schedulers(triton_model_name, request_id, prefix_hashes)
        for endpoint in first:
            try:
                return await self._route_at(endpoint, request)
            except (SchedulerGone, TimeoutError) as exc:
                SCHEDULER_FAILOVERS.inc()
                log.warning("scheduler_unreachable_failing_over", scheduler=endpoint,
                            error=str(exc) or "no answer in time")
        try:
            return await self._route_at(last, request)
        except (SchedulerGone, TimeoutError) as exc:
            raise SchedulersAway(f"no scheduler answered ({str(exc) or 'in time'})",
                                 retry_after_s=1.0) from exc

    async def _route_at(self, endpoint: str, request: scheduler_pb2.RouteRequest) -> Route:
        reply = await self._stream(endpoint).route(request, self._timeout_s)
        self._routed_by[reply.reservation_id] = endpoint
        return Route(reply.replica_id, reply.grpc_endpoint, reply.reservation_id)

    async def release_route(
        self, reservation_id: str, outcome: Outcome = Outcome.UNREPORTED,
        completion_tokens: int = 0,
    ) -> None:
        """Frees the reservation and says how the generation went (the replica's breaker)."""
        endpoint = self._routed_by.pop(reservation_id, None)
        if endpoint is None or endpoint not in self._live_endpoints():
            return  # not routed by this client, already released, or its instance left
        self._stream(endpoint).release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reservation_id, outcome=OUTCOMES[outcome],
            completion_tokens=completion_tokens))
