"""The sidecar's side of the KV events: it follows each served model's socket into a mirror of
that engine's blocks, and streams the mirrors to every scheduler that subscribes.

Following: one task per model READY, reading `SubscribeResponse` frames from the model's socket
(`kv_event_socket.py`) into a `KvEventLog` mirror (`relay`: a snapshot replaces the view, a batch
must follow the last one of its epoch). A gap (never expected on a stream socket, but the engine
drops a reader that falls behind), a broken frame, EOF or `READ_TIMEOUT_S` of silence (a
heartbeat comes every `HEARTBEAT_S`) ends the connection; the next one starts from a snapshot.

Serving (`KvEventsService/Subscribe`): each stream subscribes to every mirror (and to each
model's mirror as it appears), so it gets each model's snapshot, then its batches; when a mirror
took a new snapshot, so does every stream. A stream whose scheduler reads too slowly falls more
than `max_queued` batches behind and is ended (the scheduler reconnects and starts again from
snapshots), so no scheduler slows the others or grows the sidecar's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Iterable

import grpc
from prometheus_client import Counter, Gauge

from backends.triton.kv_event_socket import in_shared_temp, is_private_directory, socket_path
from infermesh.v1 import kv_events_pb2
from services.common.kv_event_codec import (
    HEADER_BYTES,
    HEARTBEAT_S,
    READ_TIMEOUT_S,
    FrameError,
    encode,
    frame_length,
    parse,
)
from services.common.kv_events import KvEventLog, KvSnapshot, Subscription
from services.common.logs import get_logger

__all__ = ["KvEventsServicer", "KvMirrors"]

log = get_logger(__name__)
RECONNECTS = Counter("infermesh_sidecar_kv_event_reconnects_total",
                     "Connections to a model's KV-event socket that ended, by reason.",
                     ["model", "reason"])
SUBSCRIBERS = Gauge("infermesh_sidecar_kv_event_subscribers",
                    "Schedulers streaming this replica's KV events now.")
RETRY_S = (0.1, 2.0)  # first and longest wait before connecting to a model's socket again


class KvMirrors:
    """Each served model's engine blocks, as its events say; one asyncio loop owns it."""

    def __init__(self, directory: pathlib.Path | None, max_queued: int = 1024):
        """`directory` None: the models serve no events, and the mirrors stay empty."""
        self._directory = directory
        self._max_queued = max_queued
        self.logs: dict[str, KvEventLog] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._wakers: set[asyncio.Event] = set()  # one per Subscribe stream

    def follow(self, models: Iterable[str]) -> None:
        """Follows exactly `models` (the ones READY): new ones start, gone ones stop."""
        if self._directory is None:
            return
        wanted = set(models)
        for model in set(self._followers) - wanted:
            self._followers.pop(model).cancel()
            self.logs.pop(model, None)
        for model in wanted - set(self._followers):
            self.logs[model] = KvEventLog(self._max_queued)
            self._followers[model] = asyncio.create_task(
                self._follow(model, socket_path(self._directory, model)),
                name=f"kv events {model}")
        self._wake()

    async def close(self) -> None:
        tasks = list(self._followers.values())
        self._followers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def waker(self) -> asyncio.Event:
        event = asyncio.Event()
        self._wakers.add(event)
        return event

    def drop_waker(self, event: asyncio.Event) -> None:
        self._wakers.discard(event)

    def _wake(self) -> None:
        for event in self._wakers:
            event.set()

    async def _follow(self, model: str, path: pathlib.Path) -> None:
        delay_s = RETRY_S[0]
        while True:
            reason = await self._read(model, path)
            RECONNECTS.labels(model, reason).inc()
            if reason != "connect":  # it was connected: reconnect soon
                delay_s = RETRY_S[0]
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_S[1])

    async def _read(self, model: str, path: pathlib.Path) -> str:
        """Reads one connection until it ends; why it ended."""
        if in_shared_temp(path.parent) and not is_private_directory(path.parent):
            # A predictable folder under /tmp that another user made or may enter: whatever
            # listens there may forge events (the launcher refuses to start in it, too).
            log.warning("kv_events_directory_refused", directory=str(path.parent))
            return "unsafe_directory"
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(path))
        except (OSError, TimeoutError):
            return "connect"  # not up yet, or restarting
        mirror = self.logs[model]
        try:
            while True:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    header = await reader.readexactly(HEADER_BYTES)
                    body = await reader.readexactly(frame_length(header))
                decoded = parse(body)
                if decoded is None:
                    continue  # a heartbeat
                _, item = decoded
                if isinstance(item, KvSnapshot) and item.epoch == mirror.snapshot().epoch \
                        and item.seq == mirror.snapshot().seq:
                    continue  # what the mirror holds already (a reconnect with no change)
                if not mirror.relay(item):
                    log.warning("kv_event_gap", model=model)
                    return "gap"
                self._wake()
        except TimeoutError:
            return "silent"
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed"
        except FrameError as exc:
            log.warning("kv_event_bad_frame", model=model, error=str(exc))
            return "bad_frame"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class KvEventsServicer:
    """`infermesh.v1.KvEventsService`: the mirrors, to each scheduler, snapshot first."""

    def __init__(self, mirrors: KvMirrors):
        self._mirrors = mirrors

    async def Subscribe(self, request: kv_events_pb2.SubscribeRequest,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[kv_events_pb2.SubscribeResponse]:
        mirrors = self._mirrors
        waker = mirrors.waker()
        subscriptions: dict[str, tuple[KvEventLog, Subscription]] = {}
        SUBSCRIBERS.inc()
        try:
            while True:
                waker.clear()
                for model, mirror in list(mirrors.logs.items()):
                    held = subscriptions.get(model)
                    if held is None or held[0] is not mirror:
                        subscriptions[model] = (mirror, mirror.subscribe())
                for model in set(subscriptions) - set(mirrors.logs):
                    mirror, subscription = subscriptions.pop(model)
                    mirror.unsubscribe(subscription)
                sent = False
                for model, (_, subscription) in subscriptions.items():
                    items = subscription.take(0.0)
                    if items is None:  # this scheduler fell behind: it reconnects
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            f"the KV events of {model} fell behind")
                    for item in items:
                        yield encode(model, item)
                        sent = True
                if not sent:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(HEARTBEAT_S):
                            await waker.wait()
                    if not waker.is_set():
                        yield kv_events_pb2.SubscribeResponse()  # a heartbeat
        finally:
            SUBSCRIBERS.dec()
            mirrors.drop_waker(waker)
            for mirror, subscription in subscriptions.values():
                mirror.unsubscribe(subscription)
