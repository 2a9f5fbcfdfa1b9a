"""Idempotency keys: a request repeated with the same key by the same tenant within the TTL gets
the first outcome — replayed if it finished, joined if it is still running — and is run, and
charged, once.

Entries are per tenant: the lookup key is (tenant, idempotency key), so one tenant's keys can
never reveal or collide with another's. A key reused with a different request (another model,
prompt or parameters) is refused. Outcomes worth retrying are not kept: a refused request (bad
input, quota, overload, no replica) or a cancelled one runs again on the next try.

Entries live in this gateway's memory, bounded three ways so that no tenant can evict another's:
at most `max_entries_per_tenant` entries and `max_tenant_bytes` per tenant (past either, that
tenant's own oldest entry goes), and `max_bytes` in all (past it, the oldest entry of the tenant
holding the most goes — the caller's own when it is among the largest). Bytes are estimated:
characters of the keys and of the text kept for replay, plus a fixed overhead per entry and per
event.
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
from services.gateway.pipeline import Event, Finished, Send, TokenText
from services.gateway.requests import GenerationRequest

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
    tenant: str
    key: str
    fingerprint: str
    created: float
    size: int  # estimated bytes, counted in the cache's totals while the entry is in it
    events: list[Event] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    evicted: bool = False  # still served to the requests that joined it, no longer counted


class IdempotencyCache:
    def __init__(self, ttl_s: float = 600.0, max_entries_per_tenant: int = 1_000,
                 max_tenant_bytes: int = 16 << 20, max_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._max_entries_per_tenant = max_entries_per_tenant
        self._max_tenant_bytes = max_tenant_bytes
        self._max_bytes = max_bytes
        self._clock = clock
        self._by_age: collections.OrderedDict[tuple[str, str], _Entry] = (
            collections.OrderedDict())
        self._tenants: dict[str, collections.OrderedDict[str, _Entry]] = {}
        self._tenant_bytes: collections.Counter[str] = collections.Counter()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Estimated bytes held, all tenants together."""
        return self._bytes

    def entries(self, tenant: str) -> int:
        return len(self._tenants.get(tenant, ()))

    async def run(
        self, tenant: str, request: GenerationRequest, send: Send,
        generate: Callable[[Send], Awaitable[Finished]],
    ) -> Finished:
        """Runs `generate` once per (tenant, key) within the TTL; repeats replay or join it."""
        if not request.idempotency_key:
            return await generate(send)
        self._expire()
        key = request.idempotency_key
        entry = self._tenants.get(tenant, {}).get(key)
        if entry is not None:
            if entry.fingerprint != fingerprint(request):
                raise errors.InvalidArgument(
                    "idempotency_key", "was already used with a different request")
            return await self._follow(entry, request.request_id, send)
        entry = _Entry(tenant, key, fingerprint(request), self._clock(),
                       ENTRY_OVERHEAD_BYTES + len(tenant) + len(key))
        self._insert(entry)

        async def record(event: Event) -> None:
            async with entry.changed:
                entry.events.append(event)
                entry.changed.notify_all()
            if not entry.evicted:
                self._grow(entry, _event_bytes(event))
            await send(event)

        try:
            finished = await generate(record)
        finally:
            entry.done.set()
            async with entry.changed:
                entry.changed.notify_all()
            if not keeps(entry.events):
                self._evict(entry)
        return finished

    def _insert(self, entry: _Entry) -> None:
        self._by_age[(entry.tenant, entry.key)] = entry
        self._tenants.setdefault(entry.tenant, collections.OrderedDict())[entry.key] = entry
        self._grow(entry, entry.size, counted=False)

    def _grow(self, entry: _Entry, size: int, counted: bool = True) -> None:
        """Counts `size` more bytes for `entry`, then evicts until every bound holds."""
        if counted:
            entry.size += size
        self._tenant_bytes[entry.tenant] += size
        self._bytes += size
        tenant = entry.tenant
        while (len(self._tenants.get(tenant, ())) > self._max_entries_per_tenant
               or self._tenant_bytes[tenant] > self._max_tenant_bytes):
            self._evict(next(iter(self._tenants[tenant].values())))
        while self._bytes > self._max_bytes:
            largest = max(self._tenants,
                          key=lambda t: (self._tenant_bytes[t], t == tenant))
            self._evict(next(iter(self._tenants[largest].values())))

    def _evict(self, entry: _Entry) -> None:
        """Forgets `entry` (if it is still held); requests following it keep their reference."""
        tenant_entries = self._tenants.get(entry.tenant)
        if entry.evicted or tenant_entries is None or tenant_entries.get(entry.key) is not entry:
            return
        entry.evicted = True
        del tenant_entries[entry.key]
        del self._by_age[(entry.tenant, entry.key)]
        self._tenant_bytes[entry.tenant] -= entry.size
        self._bytes -= entry.size
        if not tenant_entries:
            del self._tenants[entry.tenant]
            del self._tenant_bytes[entry.tenant]

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
        while self._by_age:
            entry = next(iter(self._by_age.values()))
            if entry.created > horizon:
                return
            self._evict(entry)
