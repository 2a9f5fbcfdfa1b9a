"""A gateway's routes and releases to one scheduler instance over one long-lived `RouteStream`
(published: gateways import it).

Every route and release queued while the previous message was being written leaves in the next
message, so under load one message carries many decisions and the per-call cost of gRPC in
Python (the scheduler's ceiling with unary calls) is paid once per batch, not once per request.
Each route waits for its own result under its own deadline. A broken stream fails the routes it
carries with `SchedulerGone` (the caller fails over to another instance) and the next route
opens a new one. A route given up on (its deadline passed, its caller cancelled) whose result
still comes is released at once, so the scheduler holds no place nobody uses. Releases are not
acknowledged: one lost with its stream is freed by its hold, as with a scheduler that died.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import grpc

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import errors, status
from services.common.logs import get_logger

log = get_logger(__name__)

MAX_BATCH = 4096  # routes, and releases, per message (the scheduler's limit)
# A stream older than this takes no new routes (the next stream does): below the servers'
# connection-age grace (INFERMESH_MAX_CONNECTION_AGE_GRACE_S, 660 s), so no stream is cut with
# routes in flight when its connection reaches its maximum age.
MAX_STREAM_AGE_S = 300.0


class SchedulerGone(errors.Unavailable):
    """The stream to this instance broke or did not answer in time: not a verdict it sent."""


class RouteStream:
    """Routes and releases to one scheduler instance over `channel`."""

    def __init__(self, channel: grpc.aio.Channel, write_timeout_s: float,
                 max_age_s: float = MAX_STREAM_AGE_S):
        self._stub = scheduler_pb2_grpc.SchedulerStub(channel)
        self._write_timeout_s = write_timeout_s
        self._max_age_s = max_age_s
        self._opened_at = 0.0
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[scheduler_pb2.RouteResponse]] = {}
        self._routes: list[scheduler_pb2.RouteCall] = []
        self._releases: list[scheduler_pb2.ReleaseRouteRequest] = []
        self._queued = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall | None = None  # the stream new routes go on
        self._calls: set[grpc.aio.StreamStreamCall] = set()  # it, and retired ones finishing
        self._tasks: set[asyncio.Task[None]] = set()

    async def route(self, request: scheduler_pb2.RouteRequest,
                    timeout_s: float) -> scheduler_pb2.RouteResponse:
        """The scheduler's route; its refusal as a MeshError; SchedulerGone or TimeoutError when
        it did not answer."""
        self._open()
        call_id = next(self._ids)
        answer: asyncio.Future[scheduler_pb2.RouteResponse] = (
            asyncio.get_running_loop().create_future())
        self._waiting[call_id] = answer
        self._routes.append(scheduler_pb2.RouteCall(call_id=call_id, route=request))
        self._queued.set()
        async with asyncio.timeout(timeout_s):
            return await answer  # cancelled with its caller: its late result is released

    def release(self, request: scheduler_pb2.ReleaseRouteRequest) -> None:
        """Queues a release for the next message (a new stream if none is open: the instance
        may have outlived the one that routed it; ids it no longer knows are ignored)."""
        self._open()
        self._releases.append(request)
        self._queued.set()

    def _open(self) -> None:
        if self._call is not None:
            if time.monotonic() - self._opened_at < self._max_age_s:
                return
            # Retired: its writer half-closes it, its reader takes the results still due.
            self._queued.set()
        self._call = call = self._stub.RouteStream()
        self._opened_at = time.monotonic()
        self._calls.add(call)
        if self._releases:  # left over from the last stream
            self._queued.set()
        tasks = (asyncio.ensure_future(self._write(call)), asyncio.ensure_future(self._read(call)))
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(self._closed(call, tasks))

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._queued.wait()
            if call is not self._call:  # retired: what is queued goes on the new stream
                async with asyncio.timeout(self._write_timeout_s):
                    await call.done_writing()
                return
            self._queued.clear()
            routes, self._routes = self._routes[:MAX_BATCH], self._routes[MAX_BATCH:]
            releases, self._releases = self._releases[:MAX_BATCH], self._releases[MAX_BATCH:]
            if self._routes or self._releases:
                self._queued.set()
            async with asyncio.timeout(self._write_timeout_s):  # flow control: a stuck peer
                await call.write(scheduler_pb2.RouteStreamRequest(routes=routes,
                                                                  releases=releases))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        # No deadline on the next reply: an idle stream waits; each route has its own.
        async for reply in call:
            for result in reply.results:
                answer = self._waiting.pop(result.call_id, None)
                kind = result.WhichOneof("result")
                if answer is None or answer.done():
                    if kind == "route":  # given up on: nobody will release it otherwise
                        self._releases.append(scheduler_pb2.ReleaseRouteRequest(
                            reservation_id=result.route.reservation_id))
                        self._queued.set()
                elif kind == "route":
                    answer.set_result(result.route)
                else:
                    answer.set_exception(status.from_error(result.error))

    def _closed(self, call: grpc.aio.StreamStreamCall, tasks: tuple[asyncio.Task[None], ...]
                ) -> Callable[[asyncio.Task[None]], None]:
        def closed(task: asyncio.Task[None]) -> None:
            if all(t.done() for t in tasks):
                self._calls.discard(call)
            if self._call is not call:
                return  # retired and finishing, or the other task already closed it
            self._call = None
            error = None if task.cancelled() else task.exception()
            for other in tasks:
                other.cancel()
            call.cancel()
            gone = SchedulerGone(f"the route stream ended: {_describe(error)}", retry_after_s=1.0)
            waiting, self._waiting = self._waiting, {}
            self._routes = []  # failed over; releases not written yet go with the next stream
            del self._releases[:-MAX_BATCH]  # the rest expire with their holds
            for answer in waiting.values():
                if not answer.done():
                    answer.set_exception(gone)
            if error is not None and not isinstance(error, grpc.aio.AioRpcError):
                log.error("route_stream_failed", error=repr(error))
        return closed

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _describe(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error) if error is not None else "closed by the scheduler"
