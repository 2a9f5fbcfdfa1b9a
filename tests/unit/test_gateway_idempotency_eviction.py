"""An idempotency entry evicted while its first request still runs stays served to the requests
that joined it, and is no longer counted; the key then runs again."""

import asyncio

from services.gateway.idempotency import IdempotencyCache
from services.gateway.pipeline import TokenText
from tests.unit.test_gateway_idempotency import Engine, collect, request


async def test_an_entry_evicted_while_followed_is_still_served_to_its_followers():
    cache, engine, other = IdempotencyCache(max_entries_per_tenant=1), Engine(), Engine()
    other.gate.set()
    first = asyncio.ensure_future(collect(cache, "t", request("r1", key="k1"), engine))
    await asyncio.sleep(0.01)
    joined = asyncio.ensure_future(collect(cache, "t", request("r2", key="k1"), engine))
    await asyncio.sleep(0.01)
    await collect(cache, "t", request("r3", key="k2"), other)  # evicts k1, still running
    held = cache.bytes
    engine.gate.set()
    (_f1, _e1), (f2, e2) = await first, await joined
    assert [e.text for e in e2 if isinstance(e, TokenText)] == ["a", "b"]
    assert f2.finish_reason == "stop" and f2.request_id == "r2"
    assert cache.bytes == held and cache.entries("t") == 1  # the evicted entry is not counted
    await collect(cache, "t", request("r4", key="k1"), engine)
    assert engine.runs == 2



async def test_another_tenants_pressure_never_evicts_a_running_entry():
    """Past max_bytes the largest tenant's running entry stays (the next largest's finished one
    goes): its repeat joins it rather than running, and being charged, again."""
    cache, engine, other = IdempotencyCache(max_bytes=2_200), Engine(), Engine()
    other.gate.set()
    big = "t" * 600  # a long name: this tenant holds the most
    first = asyncio.ensure_future(collect(cache, big, request("r1", key="k1"), engine))
    await asyncio.sleep(0.01)
    await collect(cache, "u", request("r2", key="k2"), other)
    other.gate.set()
    second = asyncio.ensure_future(collect(cache, "v", request("r3", key="k3"), other))
    await asyncio.sleep(0.01)  # past max_bytes: "t" runs, so "u" gives way
    assert (cache.entries(big), cache.entries("u")) == (1, 0)
    joined = asyncio.ensure_future(collect(cache, big, request("r4", key="k1"), engine))
    await asyncio.sleep(0.01)
    engine.gate.set()
    await first
    await second
    (f4, _e4) = await joined
    assert f4.finish_reason == "stop" and engine.runs == 1
