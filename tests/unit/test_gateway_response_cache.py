"""The response cache's keys, bounds and expiry: per tenant, so no tenant reads or evicts
another's entries."""

from __future__ import annotations

from services.common.logprobs import TokenLogprob
from services.gateway.response_cache import (
    CachedResponse,
    ResponseCache,
    deterministic,
    request_digest,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(text: str = "Paris.", finish_reason: str = "stop") -> CachedResponse:
    return CachedResponse("sha256:v", ((text, (TokenLogprob(text, text.encode(), -0.1),)),),
                          finish_reason, 7, 2)


def test_only_deterministic_requests_and_complete_answers_are_cached():
    assert deterministic(0.0, None) and deterministic(0.7, 3) and not deterministic(0.7, None)
    cache = ResponseCache()
    for reason in ("content_filter", "cancelled", "error", "deadline"):
        cache.put("a", reason, answer(finish_reason=reason))
        assert cache.get("a", reason) is None
    cache.put("a", "k", answer(finish_reason="length"))
    assert cache.get("a", "k") == answer(finish_reason="length")


def test_a_hit_never_crosses_tenants_and_the_key_is_a_digest():
    cache = ResponseCache()
    key = request_digest("sha256:v", "EngineRequest(prompt='secret')")
    assert "secret" not in key and len(key) == 64
    assert key != request_digest("sha256:w", "EngineRequest(prompt='secret')")
    cache.put("a", key, answer())
    assert cache.get("a", key) == answer() and cache.get("b", key) is None


def test_entries_expire_after_the_ttl():
    clock = Clock()
    cache = ResponseCache(ttl_s=60, clock=clock)
    cache.put("a", "k", answer())
    clock.now = 59.0
    assert cache.get("a", "k") is not None
    clock.now = 61.0
    assert cache.get("a", "k") is None and cache.bytes == 0


def test_one_tenant_cannot_evict_anothers_entries():
    size = answer().size + len("a") + len("k00")
    cache = ResponseCache(max_entries_per_tenant=3, max_tenant_bytes=size * 4,
                          max_bytes=size * 6)
    cache.put("quiet", "k00", answer())
    for i in range(50):  # a flood: only its own oldest entries go
        cache.put("noisy", f"k{i:02}", answer())
        assert cache.entries("noisy") <= 3
    assert cache.get("quiet", "k00") == answer()
    assert cache.get("noisy", "k49") is not None and cache.get("noisy", "k00") is None
    # Past the total, the largest tenant gives way: the flood's, not the quiet one's.
    cache.put("third", "k00", answer())
    cache.put("third", "k01", answer())
    assert cache.bytes <= size * 6 and cache.get("quiet", "k00") is not None
    # A response bigger than a tenant's share is not kept at all.
    cache.put("quiet", "huge", answer("x" * size * 5))
    assert cache.get("quiet", "huge") is None
