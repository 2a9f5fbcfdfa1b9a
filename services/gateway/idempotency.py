"""Idempotency keys: a request repeated with the same key by the same tenant within the TTL gets
the first outcome — replayed if it finished, joined if it is still running — and is run, and
charged, once.

Entries are per tenant: the lookup key is (tenant, idempotency key), so one tenant's keys can
never reveal or collide with another's. A key reused with a different request (another model,
prompt or parameters) is refused. Outcomes worth retrying are not kept: a refused request (bad
input, quota, overload, no replica) or a cancelled one runs again on the next try.

Entries live in this gateway's memory, in a `TenantBoundedStore` (`tenant_store.py`), bounded three
ways: at most `max_entries_per_tenant` entries and `max_tenant_bytes` per tenant (past either,
that tenant's own oldest entry goes), and `max_bytes` in all (past it, the oldest finished entry
of the tenant holding the most goes, even under its own caps — the caller's own when it ties for
the most; no tenant loses entries to another's only when `max_bytes >= tenants ×
max_tenant_bytes`). An entry whose generation still runs is never taken for `max_bytes`, so
another tenant's pressure cannot make its repeats run (and be charged) again; an entry evicted
while requests follow it stays theirs. Bytes are estimated:
characters of the keys and of the text kept for replay, plus a fixed overhead per entry and per
event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common import errors
from services.gateway.pipeline import Event, Finished, Send, TokenText
from services.gateway.requests import GenerationRequest
from services.gateway.tenant_store import TenantBoundedStore

RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED")
ENTRY_OVERHEAD_BYTES = 512  # the entry, its fingerprint and its asyncio primitives
EVENT_OVERHEAD_BYTES = 128


def fingerprint(request: GenerationRequest) -> str:
    """What makes two requests "the same": everything but the request id and the deadline."""
    same = dataclasses.replace(request, request_id="", timeout_s=None)
    return hashlib.sha256(repr(same).encode()).hexdigest()


def keeps(events: list[Event]) -> bool:
    """Whether a generation's outcome is replayed to repeats: a finished generation, or one that
    failed after sending text (replaying is the only way not to charge it twice). A refusal
    before any text (bad input, unknown model) is not kept: running it again charges nothing
    twice, and keeping it would let bad input hold memory for the TTL."""
    if not events or not isinstance(events[-1], Finished):
        return False
    finished = events[-1]
    if finished.finish_reason == "cancelled":
        return False
    if finished.error is None:
        return True
    return (finished.error.code not in RETRYABLE
            and any(isinstance(event, TokenText) for event in events))


# What one token's log probability costs to keep, top ones included (an estimate).
LOGPROB_BYTES = 64


def _event_bytes(event: Event) -> int:
    if not isinstance(event, TokenText):
        return EVENT_OVERHEAD_BYTES
    logprobs = sum(1 + len(lp.top) for lp in event.logprobs) * LOGPROB_BYTES
    return EVENT_OVERHEAD_BYTES + len(event.text) + logprobs


@dataclass
class _Entry:
    """One key's outcome; requests following it keep their reference after it is evicted."""

    fingerprint: str
    events: list[Event] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class IdempotencyCache:
    def __init__(self, ttl_s: float = 600.0, max_entries_per_tenant: int = 1_000,
                 max_tenant_bytes: int = 16 << 20, max_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic):
        self._store: TenantBoundedStore[_Entry] = TenantBoundedStore(
            ttl_s, max_entries_per_tenant, max_tenant_bytes, max_bytes, clock,
            evictable=lambda entry: entry.done.is_set())

    @property
    def bytes(self) -> int:
        """Estimated bytes held, all tenants together."""
        return self._store.bytes

    def entries(self, tenant: str) -> int:
        return self._store.entries(tenant)

    async def run(
        self, tenant: str, request: GenerationRequest, send: Send,
        generate: Callable[[Send], Awaitable[Finished]],
    ) -> Finished:
        """Runs `generate` once per (tenant, key) within the TTL; repeats replay or join it."""
        if not request.idempotency_key:
            return await generate(send)
        key = request.idempotency_key
        entry = self._store.get(tenant, key)
        if entry is not None:
            if entry.fingerprint != fingerprint(request):
                raise errors.InvalidArgument(
                    "idempotency_key", "was already used with a different request")
            return await self._follow(entry, request.request_id, send)
        entry = _Entry(fingerprint(request))
        self._store.put(tenant, key, entry, ENTRY_OVERHEAD_BYTES + len(tenant) + len(key))

        async def record(event: Event) -> None:
            async with entry.changed:
                entry.events.append(event)
                entry.changed.notify_all()
            self._store.grow(tenant, key, entry, _event_bytes(event))
            await send(event)

        try:
            finished = await generate(record)
        finally:
            entry.done.set()
            async with entry.changed:
                entry.changed.notify_all()
            if not keeps(entry.events):
                self._store.remove(tenant, key, entry)
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

