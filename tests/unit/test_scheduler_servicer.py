"""The Scheduler servicer over in-memory views of its two caches: validation names the field,
Release feeds the demand callback once per served request, and ListReplicas shows load and
breaker state."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from infermesh.v1 import scheduler_pb2
from services.common import status
from services.scheduler.breakers import BreakerSettings
from services.scheduler.routing import Policy, Router, RoutingConfig
from services.scheduler.server import CALLS_BETWEEN_YIELDS, SchedulerServicer
from tests.unit.scheduler_builders import replica, report


class Items:
    """What the servicer reads of a WatchCache: `items` and `get`."""

    def __init__(self, items: dict):
        self.items = items

    def get(self, key):
        return self.items.get(key)


class Aborted(Exception):
    pass


class Context:
    """Records the status an RPC ends with (as grpc.aio's context.abort, it raises)."""

    async def abort(self, code, details, trailing_metadata=()):
        self.code = code
        self.details = details
        raise Aborted


def servicer(on_release=None, now=1.0):
    replicas = Items({"a": replica("a", zone="z"), "b": replica("b", zone="z")})
    loads = Items({"a": report("a", 0.9, free=30, active=2, waiting=1)})
    router = Router(RoutingConfig(policy=Policy.LEAST_LOADED,
                                  breakers=BreakerSettings(consecutive_failures=1)))
    return SchedulerServicer(replicas, loads, router, max_hold_s=60, on_release=on_release,
                             clock=lambda: now)


def route_request(**fields):
    return scheduler_pb2.RouteRequest(triton_model_name="m", hold=status.seconds_to_duration(10),
                                      **fields)


async def test_release_reports_demand_once_per_served_request():
    demand = []
    s = servicer(on_release=lambda *args: demand.append(args))
    outcomes = [scheduler_pb2.ROUTE_OUTCOME_FAILED_BEFORE_FIRST_TOKEN,  # retried: counted there
                scheduler_pb2.ROUTE_OUTCOME_OK, scheduler_pb2.ROUTE_OUTCOME_CANCELLED]
    for outcome in outcomes:
        reply = await s.Route(route_request(prompt_tokens=40), Context())
        released = await s.Release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id, outcome=outcome, completion_tokens=7), Context())
        assert released.released
    assert demand == [("m", 40, 7), ("m", 40, 7)]
    again = await s.Release(scheduler_pb2.ReleaseRouteRequest(reservation_id=reply.reservation_id),
                            Context())
    assert not again.released and len(demand) == 2


async def test_a_failing_demand_callback_never_fails_the_release():
    def broken(*args):
        raise RuntimeError("meter down")

    s = servicer(on_release=broken)
    reply = await s.Route(route_request(), Context())
    released = await s.Release(scheduler_pb2.ReleaseRouteRequest(
        reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK), Context())
    assert released.released


@pytest.mark.parametrize("fields, field", [
    ({"triton_model_name": ""}, "triton_model_name"),
    ({"hold": status.seconds_to_duration(120)}, "hold"),
    ({"prefix_hashes": list(range(257))}, "prefix_hashes"),
    ({"kv_block_hashes": list(range(257)), "kv_block_tokens": 16}, "kv_block_hashes"),
    ({"kv_block_hashes": [1, 2]}, "kv_block_tokens"),
    ({"kv_block_tokens": 65_537}, "kv_block_tokens"),
    ({"zone": "z" * 65}, "zone"),
    ({"exclude_replicas": [str(i) for i in range(65)]}, "exclude_replicas"),
    ({"prompt_tokens": 10_000_001}, "prompt_tokens"),
])
async def test_route_fields_are_validated(fields, field):
    context = Context()
    request = scheduler_pb2.RouteRequest(triton_model_name="m",
                                         hold=status.seconds_to_duration(10))
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        elif name == "hold":
            request.hold.CopyFrom(value)
        else:
            setattr(request, name, value)
    with pytest.raises(Aborted):
        await servicer().Route(request, context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and field in context.details


async def test_list_replicas_shows_load_and_breakers():
    s = servicer()
    reply = await s.Route(route_request(exclude_replicas=["a"]), Context())
    await s.Release(scheduler_pb2.ReleaseRouteRequest(
        reservation_id=reply.reservation_id,
        outcome=scheduler_pb2.ROUTE_OUTCOME_FAILED_AFTER_FIRST_TOKEN), Context())
    listing = {r.replica_id: r for r in (await s.ListReplicas(
        scheduler_pb2.ListReplicasRequest(), Context())).replicas}
    a, b = listing["a"], listing["b"]
    assert a.load_reported and a.load_fresh and round(a.load_age_s, 3) == 0.1
    assert (a.loads[0].kv_free_blocks, a.loads[0].active, a.loads[0].waiting) == (30, 2, 1)
    assert not b.load_reported and not b.loads
    assert b.breaker == scheduler_pb2.BREAKER_STATE_OPEN
    assert a.breaker == scheduler_pb2.BREAKER_STATE_CLOSED
    assert a.zone_breaker == scheduler_pb2.BREAKER_STATE_CLOSED  # one of two failing: not most
    assert (a.unroutable_because, b.unroutable_because) == ("", "circuit breaker not open")


async def test_release_refuses_an_impossible_token_count_and_keeps_the_reservation():
    demand: list[tuple] = []
    s = servicer(on_release=lambda *args: demand.append(args))
    reply = await s.Route(route_request(), Context())
    context = Context()
    with pytest.raises(Aborted):
        await s.Release(scheduler_pb2.ReleaseRouteRequest(
            reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK,
            completion_tokens=4_000_000_000), context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "completion_tokens" in context.details and demand == []
    released = await s.Release(scheduler_pb2.ReleaseRouteRequest(
        reservation_id=reply.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK), Context())
    assert released.released  # the refused call changed nothing


async def stream_of(*messages):
    for message in messages:
        yield message


async def test_route_stream_answers_each_route_in_order_and_releases_first():
    """One message's routes get one reply with a result per call id (a refusal is that call's
    error, the others are routed); the next message's releases free places before its routes."""
    demand: list[tuple] = []
    s = servicer(on_release=lambda *args: demand.append(args))
    first = scheduler_pb2.RouteStreamRequest(routes=[
        scheduler_pb2.RouteCall(call_id=7, route=route_request(prompt_tokens=3)),
        scheduler_pb2.RouteCall(call_id=8, route=route_request(prefix_hashes=range(257))),
        scheduler_pb2.RouteCall(call_id=9, route=route_request()),
    ])
    replies = [r async for r in s.RouteStream(stream_of(first), Context())]
    assert len(replies) == 1
    results = replies[0].results
    assert [r.call_id for r in results] == [7, 8, 9]
    assert [r.WhichOneof("result") for r in results] == ["route", "error", "route"]
    assert (results[1].error.code, results[1].error.field) == ("INVALID_ARGUMENT",
                                                              "prefix_hashes")
    listing = await s.ListReplicas(None, Context())
    assert sum(r.in_flight for r in listing.replicas) == 2
    second = scheduler_pb2.RouteStreamRequest(
        releases=[scheduler_pb2.ReleaseRouteRequest(
            reservation_id=r.route.reservation_id, outcome=scheduler_pb2.ROUTE_OUTCOME_OK,
            completion_tokens=5) for r in (results[0], results[2])])
    assert [r async for r in s.RouteStream(stream_of(second), Context())] == []  # no routes
    listing = await s.ListReplicas(None, Context())
    assert all(r.in_flight == 0 for r in listing.replicas)
    assert demand == [("m", 3, 5), ("m", 0, 5)]


async def test_route_stream_ends_with_the_field_of_a_malformed_release():
    s = servicer()
    context = Context()
    message = scheduler_pb2.RouteStreamRequest(releases=[
        scheduler_pb2.ReleaseRouteRequest(reservation_id="x"),
        scheduler_pb2.ReleaseRouteRequest(reservation_id="y", outcome=99)])
    with pytest.raises(Aborted):
        async for _ in s.RouteStream(stream_of(message), context):
            pass
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "releases[1].outcome" in context.details


async def test_a_long_route_stream_message_yields_to_the_loop():
    """A message of many routes lets other work run between its calls (etcd keep-alives,
    other streams), every CALLS_BETWEEN_YIELDS calls."""
    s = servicer()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    message = scheduler_pb2.RouteStreamRequest(routes=[
        scheduler_pb2.RouteCall(call_id=n, route=route_request()) for n in range(256)])
    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    started = ticks
    try:
        replies = [r async for r in s.RouteStream(stream_of(message), Context())]
    finally:
        ticker.cancel()
    assert len(replies[0].results) == 256
    assert ticks - started >= 256 // CALLS_BETWEEN_YIELDS
