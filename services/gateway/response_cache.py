"""The response cache: a deterministic request (temperature 0, or a fixed seed) repeated by the
same tenant within a short TTL is answered from the first answer's text, without an engine and
without charging the tenant tokens (a hit is still a request against its requests per minute).

Entries are per tenant and keyed by a sha256 of the canonical engine request (the version id,
the prompt as the engine gets it, every sampling parameter after the version's defaults): the
cache holds that digest, never the request or its prompt, and a lookup names its tenant, so a
hit never crosses tenants. Only complete answers are kept (`stop` or `length`): a refusal, a
content-filter cut, a cancelled or failed generation runs again; the pipeline also keeps none that
answered less than the key asked (`pipeline._answers_in_full`).

Memory is bounded three ways by a `TenantBoundedStore` (`tenant_store.py`), as the idempotency
cache's: at most `max_entries_per_tenant` entries and `max_tenant_bytes` per tenant (past either,
that tenant's own oldest entry goes) and `max_bytes` in all (past it, the oldest entry of the
tenant holding the most goes, even under its own caps; no tenant loses entries to another's only
when `max_bytes >= tenants × max_tenant_bytes`). Bytes are estimated: the
text, the log probabilities and a fixed overhead per entry.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.logprobs import TokenLogprob
from services.gateway.tenant_store import TenantBoundedStore

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


class ResponseCache:
    def __init__(self, ttl_s: float = 60.0, max_entries_per_tenant: int = 1_000,
                 max_tenant_bytes: int = 8 << 20, max_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic):
        self._max_tenant_bytes = max_tenant_bytes
        self._max_bytes = max_bytes
        self._store: TenantBoundedStore[CachedResponse] = TenantBoundedStore(
            ttl_s, max_entries_per_tenant, max_tenant_bytes, max_bytes, clock)

    @property
    def bytes(self) -> int:
        """Estimated bytes held, all tenants together."""
        return self._store.bytes

    def entries(self, tenant: str) -> int:
        return self._store.entries(tenant)

    def get(self, tenant: str, digest: str) -> CachedResponse | None:
        return self._store.get(tenant, digest)

    def put(self, tenant: str, digest: str, response: CachedResponse) -> None:
        """Keeps a complete answer (`stop` or `length`); anything else is ignored. A response
        bigger than a tenant's whole share is not kept."""
        if response.finish_reason not in CACHEABLE_FINISH_REASONS:
            return
        size = response.size + len(tenant) + len(digest)
        if size > min(self._max_tenant_bytes, self._max_bytes):
            return
        self._store.put(tenant, digest, response, size)
