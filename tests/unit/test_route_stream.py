"""`RouteStream` against an in-process gRPC scheduler whose answers the test holds back or whose
streams it breaks: a stream's break fails only the routes written on it, whether it is the
current stream or one retired by its age."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import status
from services.common.net import LOOPBACK, free_port
from services.scheduler.client import RouteStream, SchedulerGone


class HeldScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Routes to "held" wait for `go`; a stream carrying "broken" aborts at once, one carrying
    "doomed" aborts once `go` is set; the others are answered at once."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def RouteStream(self, request_iterator, context):
        async for message in request_iterator:
            models = {call.route.triton_model_name for call in message.routes}
            if "broken" in models:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "broken on purpose")
            if models & {"held", "doomed"}:
                await self.go.wait()
            if "doomed" in models:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "doomed on purpose")
            yield scheduler_pb2.RouteStreamResponse(results=[
                scheduler_pb2.RouteResult(call_id=call.call_id, route=scheduler_pb2.RouteResponse(
                    replica_id="r", reservation_id=f"res-{call.call_id}"))
                for call in message.routes])


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldScheduler, grpc.aio.Channel]]:
    server = grpc.aio.server()
    fake = HeldScheduler()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)
    port = free_port()
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            yield fake, channel
    finally:
        await server.stop(0)


def request(model: str) -> scheduler_pb2.RouteRequest:
    return scheduler_pb2.RouteRequest(triton_model_name=model,
                                      hold=status.seconds_to_duration(30))


async def written(stream: RouteStream, model: str) -> asyncio.Task:
    """A route in flight: written on the stream open now (each route opens its own: age 0)."""
    route = asyncio.ensure_future(stream.route(request(model), 5.0))
    await asyncio.sleep(0.2)
    assert not route.done()
    return route


async def test_the_current_streams_break_spares_a_retired_streams_routes(held):
    fake, channel = held
    stream = RouteStream(channel, write_timeout_s=2.0, max_age_s=0.0)
    on_retired = await written(stream, "held")
    with pytest.raises(SchedulerGone):
        await stream.route(request("broken"), 5.0)  # the current stream, broken
    fake.go.set()
    assert (await on_retired).reservation_id  # answered by its own stream, not failed over
    await stream.close(timeout_s=2.0)


async def test_a_retired_streams_break_fails_its_routes_at_once(held):
    fake, channel = held
    stream = RouteStream(channel, write_timeout_s=2.0, max_age_s=0.0)
    on_retired = await written(stream, "doomed")
    on_current = await written(stream, "held")
    fake.go.set()
    async with asyncio.timeout(2.0):  # well before the route's own deadline (5 s)
        with pytest.raises(SchedulerGone):
            await on_retired
        assert (await on_current).reservation_id
    await stream.close(timeout_s=2.0)
