"""A gateway's routes and releases to one scheduler instance over one long-lived `RouteStream`
(published: gateways import it).

Every route and release queued while the previous message was being written leaves in the next
message, so under load one message carries many decisions and the per-call cost of gRPC in
Python (the scheduler's ceiling with unary calls) is paid once per batch, not once per request.
A release waits up to `RELEASE_WAIT_S` for a route to leave with.
A message is cut by count and by size, so it stays far below the scheduler's 4 MiB receive limit
and no message keeps the scheduler's loop busy for long. Each route waits for its own result
under its own deadline. A broken stream fails the routes it carries with `SchedulerGone` (the
caller fails over to another instance) and the next route opens a new one; a retired stream
(past its age) still answers the routes written on it, and only its own break fails them. A
route given up on (its deadline passed, its caller cancelled) whose result still comes is
released at once, so the scheduler holds no place nobody uses. Releases are not acknowledged:
one lost with its stream is freed by its hold, as with a scheduler that died. `close` writes the
releases still queued before the streams end (a gateway shutting down leaves nothing held).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import errors, status
from services.common.logs import get_logger

log = get_logger(__name__)

# Routes, and releases, per message: at the scheduler's ~80 µs a route, a message holds its loop
# for ~20 ms at most (etcd keep-alives and other gateways' streams wait that long).
MAX_BATCH = 256
# Serialized calls per message (at least one): a quarter of gRPC's default receive limit, which
# 256 routes of 256 prefix blocks each (~2.6 KB a route) would otherwise come near.
MAX_MESSAGE_BYTES = 1 << 20
# A stream older than this takes no new routes (the next stream does): below the servers'
# connection-age grace (INFERMESH_MAX_CONNECTION_AGE_GRACE_S, 660 s), so no stream is cut with
# routes in flight when its connection reaches its maximum age.
MAX_STREAM_AGE_S = 300.0
# How long a release waits for a route to ride with: under load most leave with the next route's
# message, which saves a write (a syscall on the gateway's event loop) per generation; the
# scheduler hears of the release at most this much later (its reservation, its breaker).
RELEASE_WAIT_S = 0.005

Answer = asyncio.Future[scheduler_pb2.RouteResponse]
Call = TypeVar("Call", scheduler_pb2.RouteCall, scheduler_pb2.ReleaseRouteRequest)


class SchedulerGone(errors.Unavailable):
    """The stream to this instance broke or did not answer in time: not a verdict it sent."""


@dataclass(eq=False)
class _Call:
    """One RouteStream call and the routes written on it that wait for their results."""

    call: grpc.aio.StreamStreamCall
    opened_at: float
    waiting: dict[int, Answer] = field(default_factory=dict)
    tasks: tuple[asyncio.Task[None], ...] = ()
    ended: bool = False


class RouteStream:
    """Routes and releases to one scheduler instance over `channel`."""

    def __init__(self, channel: grpc.aio.Channel, write_timeout_s: float,
                 max_age_s: float = MAX_STREAM_AGE_S):
        self._stub = scheduler_pb2_grpc.SchedulerStub(channel)
        self._write_timeout_s = write_timeout_s
        self._max_age_s = max_age_s
        self._ids = itertools.count(1)
        self._routes: list[tuple[scheduler_pb2.RouteCall, Answer]] = []  # for the current call
        self._releases: list[scheduler_pb2.ReleaseRouteRequest] = []
        self._queued = asyncio.Event()
        self._releases_due: asyncio.TimerHandle | None = None  # wakes the writer for releases
        self._current: _Call | None = None  # the call new routes go on
        self._calls: set[_Call] = set()  # it, and retired ones finishing
        self._closing = False

    async def route(self, request: scheduler_pb2.RouteRequest,
                    timeout_s: float) -> scheduler_pb2.RouteResponse:
        """The scheduler's route; its refusal as a MeshError; SchedulerGone or TimeoutError when
        it did not answer."""
        if self._closing:
            raise SchedulerGone("the route stream is closing", retry_after_s=1.0)
        self._open()
        answer: Answer = asyncio.get_running_loop().create_future()
        self._routes.append((scheduler_pb2.RouteCall(call_id=next(self._ids), route=request),
                             answer))
        self._queued.set()
        async with asyncio.timeout(timeout_s):
            return await answer  # cancelled with its caller: its late result is released

    def release(self, request: scheduler_pb2.ReleaseRouteRequest) -> None:
        """Queues a release for the next message (a new stream if none is open: the instance
        may have outlived the one that routed it; ids it no longer knows are ignored)."""
        if not self._closing:  # closing: it goes if the current stream still writes
            self._open()
        self._releases.append(request)
        if self._releases_due is None:  # with the next route, or in RELEASE_WAIT_S
            self._releases_due = asyncio.get_running_loop().call_later(
                RELEASE_WAIT_S, self._release_now)

    def _release_now(self) -> None:
        self._releases_due = None
        self._queued.set()

    async def close(self, timeout_s: float) -> None:
        """Takes no more routes; writes the releases (and routes) still queued, half-closes each
        stream and waits up to `timeout_s` for the results they owe, then cancels what is left."""
        self._closing = True
        if self._releases_due is not None:  # they go now
            self._releases_due.cancel()
            self._releases_due = None
        self._queued.set()
        tasks = [task for call in self._calls for task in call.tasks]
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.wait(tasks)
        for call in list(self._calls):
            call.call.cancel()
            for task in call.tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _open(self) -> None:
        if self._current is not None:
            if time.monotonic() - self._current.opened_at < self._max_age_s:
                return
            # Retired: its writer half-closes it, its reader takes the results still due.
            self._queued.set()
        self._current = call = _Call(self._stub.RouteStream(), time.monotonic())
        self._calls.add(call)
        if self._releases:  # left over from the last stream
            self._queued.set()
        call.tasks = (asyncio.ensure_future(self._write(call)),
                      asyncio.ensure_future(self._read(call)))
        for task in call.tasks:
            task.add_done_callback(functools.partial(self._ended, call))

    async def _write(self, call: _Call) -> None:
        while True:
            await self._queued.wait()
            if call is not self._current or (
                    self._closing and not self._routes and not self._releases):
                # Retired (what is queued goes on the new stream), or closing with all written.
                async with asyncio.timeout(self._write_timeout_s):
                    await call.call.done_writing()
                return
            self._queued.clear()
            if not self._routes and not self._releases:  # their wake-up came after they left
                continue
            releases = _cut(self._releases, MAX_MESSAGE_BYTES, first=True)
            routes = _cut([route for route, _ in self._routes[:MAX_BATCH]],
                          MAX_MESSAGE_BYTES - sum(r.ByteSize() for r in releases),
                          first=not releases)
            for route, answer in self._routes[:len(routes)]:
                call.waiting[route.call_id] = answer
            del self._releases[:len(releases)], self._routes[:len(routes)]
            if self._routes or self._releases or self._closing:
                self._queued.set()
            async with asyncio.timeout(self._write_timeout_s):  # flow control: a stuck peer
                await call.call.write(scheduler_pb2.RouteStreamRequest(routes=routes,
                                                                       releases=releases))

    async def _read(self, call: _Call) -> None:
        # No deadline on the next reply: an idle stream waits; each route has its own.
        async for reply in call.call:
            for result in reply.results:
                answer = call.waiting.pop(result.call_id, None)
                kind = result.WhichOneof("result")
                if answer is None or answer.done():
                    if kind == "route":  # given up on: nobody will release it otherwise
                        self.release(scheduler_pb2.ReleaseRouteRequest(
                            reservation_id=result.route.reservation_id))
                elif kind == "route":
                    answer.set_result(result.route)
                else:
                    answer.set_exception(status.from_error(result.error))

    def _ended(self, call: _Call, task: asyncio.Task[None]) -> None:
        """A task of `call` ended: the stream is over unless its writer just half-closed it
        (its reader still takes the results due); its own waiting routes fail over."""
        if all(t.done() for t in call.tasks):
            self._calls.discard(call)
        error = None if task.cancelled() else task.exception()
        if call.ended or (task is call.tasks[0] and not task.cancelled() and error is None):
            return
        call.ended = True
        for other in call.tasks:
            other.cancel()
        call.call.cancel()
        gone = SchedulerGone(f"the route stream ended: {_describe(error)}", retry_after_s=1.0)
        waiting = list(call.waiting.values())
        call.waiting.clear()
        if call is self._current:
            self._current = None
            waiting += [answer for _, answer in self._routes]  # they would have gone on it
            self._routes = []  # failed over; releases not written yet go with the next stream
            del self._releases[:-MAX_BATCH]  # the rest expire with their holds
        for answer in waiting:
            if not answer.done():
                answer.set_exception(gone)
        if error is not None and not isinstance(error, grpc.aio.AioRpcError):
            log.error("route_stream_failed", error=repr(error))


def _cut(queue: Sequence[Call], budget_bytes: int, first: bool) -> list[Call]:
    """The head of `queue` for one message: at most MAX_BATCH calls within `budget_bytes`
    (`first`: the message's first call, which goes whatever its size)."""
    taken: list[Call] = []
    for item in queue[:MAX_BATCH]:
        budget_bytes -= item.ByteSize()
        if budget_bytes < 0 and not (first and not taken):
            break
        taken.append(item)
    return taken


def _describe(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error) if error is not None else "closed by the scheduler"
