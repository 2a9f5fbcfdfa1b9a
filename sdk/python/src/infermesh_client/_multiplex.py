"""One `GenerateStream` shared by every streamed generation of a client.

Start and Cancel frames go out on the one call; frames coming back are routed by request id to
each generation's queue. When the call ends (the gateway restarts, the key is refused) every
generation on it gets the error, and the next `start()` opens a new call. A call the gateway
retires (past its maximum age it takes no more Starts) keeps serving the generations it has,
new ones start on a new call, and it is closed once its last generation has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Callable, Optional, Union

import grpc

from infermesh_client import _proto
from infermesh_client._errors import InfermeshError, Unavailable, from_rpc_error

# What a generation's queue holds: a ServerFrame of its own, or the error that ended the call.
Routed = Union[Any, InfermeshError]
OpenCall = Callable[[AsyncIterator[Any]], Any]


class _Call:
    """One GenerateStream call: its outbox, its routes and the task that reads it."""

    def __init__(self, open_call: OpenCall):
        self.outbox: asyncio.Queue[Optional[Any]] = asyncio.Queue()
        self.routes: dict[str, asyncio.Queue[Routed]] = {}
        self.call = open_call(self._frames())
        self.reader = asyncio.ensure_future(self._read())

    async def _frames(self) -> AsyncIterator[Any]:
        while True:
            frame = await self.outbox.get()
            if frame is None:
                return
            yield frame

    async def _read(self) -> None:
        error: InfermeshError = Unavailable("the stream ended without Final")
        try:
            async for frame in self.call:
                kind = frame.WhichOneof("frame")
                if kind == "heartbeat":
                    continue
                route = self.routes.get(getattr(frame, kind).request_id)
                if route is not None:
                    route.put_nowait(frame)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
        except asyncio.CancelledError:
            error = Unavailable("the client was closed")
            raise
        finally:
            routes, self.routes = self.routes, {}
            for route in routes.values():
                route.put_nowait(error)


class StreamMultiplexer:
    def __init__(self, open_call: OpenCall):
        self._open_call = open_call
        self._current: Optional[_Call] = None
        self._retiring: list[_Call] = []  # retired calls still running generations
        self.calls_opened = 0  # GenerateStream calls made so far (one while nothing breaks)

    def start(self, request: Any) -> asyncio.Queue[Routed]:
        """Sends Start for `request` (opening the call when none runs) and returns the queue its
        frames arrive on; a `Final` or an error is the last thing it gets."""
        current = self._current
        if current is None or current.reader.done():
            current = self._current = _Call(self._open_call)
            self.calls_opened += 1
        queue: asyncio.Queue[Routed] = asyncio.Queue()
        current.routes[request.request_id] = queue
        current.outbox.put_nowait(_proto.ClientFrame(start=request))
        return queue

    def retire(self) -> None:
        """The gateway takes no more Starts on the current call (its maximum age): the next
        `start()` opens a new one; this one ends once its generations have finished."""
        if self._current is not None:
            self._retiring.append(self._current)
            self._current = None
            self._close_idle()

    def _close_idle(self) -> None:
        for call in [c for c in self._retiring if not c.routes or c.reader.done()]:
            self._retiring.remove(call)
            call.outbox.put_nowait(None)  # half-close: the gateway ends the call

    def _call_of(self, request_id: str) -> Optional[_Call]:
        for call in (self._current, *self._retiring):
            if call is not None and request_id in call.routes:
                return call
        return None

    def cancel(self, request_id: str, *, forget: bool) -> None:
        """Sends Cancel for a running generation. `forget`: stop routing its frames (the
        caller is gone); otherwise its Final (finish_reason cancelled) still arrives."""
        current = self._call_of(request_id)
        if current is None or current.reader.done():
            return
        if forget:
            del current.routes[request_id]
        current.outbox.put_nowait(_proto.ClientFrame(cancel=_proto.Cancel(request_id=request_id)))

    def finished(self, request_id: str) -> None:
        """The generation's Final arrived: stop routing its id."""
        call = self._call_of(request_id)
        if call is not None:
            call.routes.pop(request_id, None)
            self._close_idle()

    async def close(self) -> None:
        """Ends the calls: running generations are cancelled by the gateway (a disconnect)."""
        calls = [c for c in (self._current, *self._retiring) if c is not None]
        self._current, self._retiring = None, []
        for call in calls:
            call.outbox.put_nowait(None)
            call.call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call.reader
