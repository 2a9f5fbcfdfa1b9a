"""The response cache: a deterministic request (temperature 0, or a fixed seed) repeated by the
same tenant within a short TTL is answered from the first answer's text, without an engine and
without charging the tenant tokens (a hit is still a request against its requests per minute).

Entries are per tenant and keyed by a sha256 of the canonical engine request (the version id,
the prompt as the engine gets it, every sampling parameter after the version's defaults): the
cache holds that digest, never the request or its prompt, and a lookup names its tenant, so a
hit never crosses tenants. Only complete answers are kept (`stop` or `length`): a refusal, a
content-filter cut, a cancelled or failed generation runs again; the pipeline also keeps none that
answered less than the key asked (`pipeline._answers_in_full`).

Memory is bounded three ways, as the idempotency cache's (`idempotency.py`), so that no tenant can
evict another's: at most `max_entries_per_tenant` entries and `max_tenant_bytes` per tenant (past
either, that tenant's own oldest entry goes) and `max_bytes` in all (past it, the oldest entry of
the tenant holding the most goes). Bytes are estimated: the text, the log probabilities and a
fixed overhead per entry.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.logprobs import TokenLogprob

__all__ = ["CachedResponse", "ResponseCache", "deterministic", "request_digest"]

ENTRY_OVERHEAD_BYTES = 256
PIECE_OVERHEAD_BYTES = 64
LOGPROB_BYTES = 64  # one token's log probability, each top one too (an estimate)
CACHEABLE_FINISH_REASONS = ("stop", "length")


def deterministic(temperature: float | None, seed: int | None) -> bool:
    """Whether the engine gives the same text every time: greedy, or sampled with a fixed seed."""
    return temperature == 0.0 or seed is not None


def request_digest(version_id: str, canonical_request: str) -> str:
    """The cache key: a digest of the version and the canonical request (its `repr` without the
    request id), so the cache never holds a prompt."""
    return hashlib.sha256(f"{version_id}\x00{canonical_request}".encode()).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    """What a hit replays: the text in the pieces it streamed in, and how it ended."""

    model_version: str
    pieces: tuple[tuple[str, tuple[TokenLogprob, ...]], ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def size(self) -> int:
        return ENTRY_OVERHEAD_BYTES + sum(
            PIECE_OVERHEAD_BYTES + len(text) + LOGPROB_BYTES * sum(1 + len(lp.top) for lp in lps)
            for text, lps in self.pieces)


@dataclass
class _Entry:
    tenant: str
    digest: str
    response: CachedResponse
    stored: float
    size: int


class ResponseCache:
    def __init__(self, ttl_s: float = 60.0, max_entries_per_tenant: int = 1_000,
                 max_tenant_bytes: int = 8 << 20, max_bytes: int = 64 << 20,
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

    def get(self, tenant: str, digest: str) -> CachedResponse | None:
        self._expire()
        entry = self._tenants.get(tenant, {}).get(digest)
        return entry.response if entry is not None else None

    def put(self, tenant: str, digest: str, response: CachedResponse) -> None:
        """Keeps a complete answer (`stop` or `length`); anything else is ignored. A response
        bigger than a tenant's whole share is not kept."""
        if response.finish_reason not in CACHEABLE_FINISH_REASONS:
            return
        size = response.size + len(tenant) + len(digest)
        if size > min(self._max_tenant_bytes, self._max_bytes):
            return
        self._expire()
        old = self._tenants.get(tenant, {}).get(digest)
        if old is not None:
            self._evict(old)
        entry = _Entry(tenant, digest, response, self._clock(), size)
        self._by_age[(tenant, digest)] = entry
        self._tenants.setdefault(tenant, collections.OrderedDict())[digest] = entry
        self._tenant_bytes[tenant] += size
        self._bytes += size
        while (len(self._tenants[tenant]) > self._max_entries_per_tenant
               or self._tenant_bytes[tenant] > self._max_tenant_bytes):
            self._evict(next(iter(self._tenants[tenant].values())))
        while self._bytes > self._max_bytes:
            largest = max(self._tenants, key=lambda t: (self._tenant_bytes[t], t == tenant))
            self._evict(next(iter(self._tenants[largest].values())))

    def _evict(self, entry: _Entry) -> None:
        tenant_entries = self._tenants[entry.tenant]
        del tenant_entries[entry.digest]
        del self._by_age[(entry.tenant, entry.digest)]
        self._tenant_bytes[entry.tenant] -= entry.size
        self._bytes -= entry.size
        if not tenant_entries:
            del self._tenants[entry.tenant]
            del self._tenant_bytes[entry.tenant]

    def _expire(self) -> None:
        horizon = self._clock() - self._ttl_s
        while self._by_age:
            entry = next(iter(self._by_age.values()))
            if entry.stored > horizon:
                return
            self._evict(entry)
