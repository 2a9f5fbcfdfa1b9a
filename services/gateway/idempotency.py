"""Idempotency keys: a request repeated with the same key by the same tenant within the TTL gets
the first outcome — replayed if it finished, joined if it is still running — and is run, and
charged, once.

Entries are per tenant: the lookup key is (tenant, idempotency key), so one tenant's keys can
never reveal or collide with another's. A key reused with a different request (another model,
prompt or parameters) is refused. Outcomes worth retrying are not kept: a refused request (quota,
overload, no replica) or a cancelled one runs again on the next try. Entries live in this gateway's
memory, bounded by `max_entries` and the TTL.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common import errors
from services.gateway.pipeline import Event, Finished, Send
from services.gateway.requests import GenerationRequest

RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED")


def fingerprint(request: GenerationRequest) -> str:
    """What makes two requests "the same": everything but the request id and the deadline."""
    same = dataclasses.replace(request, request_id="", timeout_s=None)
    return hashlib.sha256(repr(same).encode()).hexdigest()


def keeps(finished: Finished) -> bool:
    if finished.finish_reason == "cancelled":
        return False
    return finished.error is None or finished.error.code not in RETRYABLE


@dataclass
class _Entry:
    fingerprint: str
    created: float
    events: list[Event] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class IdempotencyCache:
    def __init__(self, ttl_s: float = 600.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()

    async def run(
        self, tenant: str, request: GenerationRequest, send: Send,
        generate: Callable[[Send], Awaitable[Finished]],
    ) -> Finished:
        """Runs `generate` once per (tenant, key) within the TTL; repeats replay or join it."""
        if not request.idempotency_key:
            return await generate(send)
        self._expire()
        key = (tenant, request.idempotency_key)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != fingerprint(request):
                raise errors.InvalidArgument(
                    "idempotency_key", "was already used with a different request")
            return await self._follow(entry, request.request_id, send)
        entry = _Entry(fingerprint(request), self._clock())
        self._entries[key] = entry
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

        async def record(event: Event) -> None:
            async with entry.changed:
                entry.events.append(event)
                entry.changed.notify_all()
            await send(event)

        try:
            finished = await generate(record)
        finally:
            entry.done.set()
            async with entry.changed:
                entry.changed.notify_all()
            if not entry.events or not isinstance(entry.events[-1], Finished) \
                    or not keeps(entry.events[-1]):
                if self._entries.get(key) is entry:
                    del self._entries[key]
        return finished

    async def _follow(self, entry: _Entry, request_id: str, send: Send) -> Finished:
        """Sends the entry's events so far, then each new one, under this request's id."""
        sent = 0
        while True:
            async with entry.changed:
                while sent == len(entry.events) and not entry.done.is_set():
                    await entry.changed.wait()
                pending = entry.events[sent:]
            for event in pending:
                await send(dataclasses.replace(event, request_id=request_id))
            sent += len(pending)
            if pending and isinstance(pending[-1], Finished):
                return dataclasses.replace(pending[-1], request_id=request_id)
            if entry.done.is_set() and sent == len(entry.events):
                raise errors.Unavailable(
                    "the first request with this idempotency key ended without an outcome; "
                    "retry", retry_after_s=0.1)

    def _expire(self) -> None:
        horizon = self._clock() - self._ttl_s
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.created > horizon:
                return
            del self._entries[key]
