import asyncio

import pytest

from services.common import errors
from services.gateway.idempotency import IdempotencyCache
from services.gateway.pipeline import Finished, TokenText
from services.gateway.requests import GenerationRequest


def request(rid, key="k", prompt="hi"):
    return GenerationRequest(request_id=rid, model="m", prompt=prompt, idempotency_key=key)


class Engine:
    """Counts runs; streams two tokens, waiting on `gate` between them."""

    def __init__(self, outcome="stop", code=None):
        self.runs = 0
        self.gate = asyncio.Event()
        self.outcome = outcome
        self.code = code

    def generate(self, rid):
        async def run(send):
            self.runs += 1
            await send(TokenText(rid, "a"))
            await self.gate.wait()
            await send(TokenText(rid, "b"))
            error = errors.BY_CODE[self.code]("x") if self.code else None
            finished = Finished(rid, self.outcome if not error else "error", error=error)
            await send(finished)
            return finished
        return run


async def collect(cache, tenant, req, engine):
    events = []

    async def send(event):
        events.append(event)

    finished = await cache.run(tenant, req, send, engine.generate(req.request_id))
    return finished, events


async def test_repeat_joins_a_running_request_and_replays_a_finished_one():
    cache, engine = IdempotencyCache(), Engine()
    first = asyncio.ensure_future(collect(cache, "t", request("r1"), engine))
    await asyncio.sleep(0.01)
    joined = asyncio.ensure_future(collect(cache, "t", request("r2"), engine))
    await asyncio.sleep(0.01)
    engine.gate.set()
    (_f1, _e1), (f2, e2) = await first, await joined
    assert engine.runs == 1
    assert [e.text for e in e2 if isinstance(e, TokenText)] == ["a", "b"]
    assert {e.request_id for e in e2} == {"r2"} and f2.request_id == "r2"
    f3, e3 = await collect(cache, "t", request("r3"), engine)
    assert engine.runs == 1 and len(e3) == 3 and f3.finish_reason == "stop"


async def test_keys_are_per_tenant_and_bound_to_the_request():
    cache, engine = IdempotencyCache(), Engine()
    engine.gate.set()
    await collect(cache, "t1", request("r1"), engine)
    await collect(cache, "t2", request("r2"), engine)
    assert engine.runs == 2
    with pytest.raises(errors.InvalidArgument) as raised:
        await collect(cache, "t1", request("r3", prompt="other"), engine)
    assert raised.value.field == "idempotency_key"


@pytest.mark.parametrize("outcome,code", [("error", "RESOURCE_EXHAUSTED"), ("cancelled", None)])
async def test_retryable_outcomes_run_again(outcome, code):
    cache, engine = IdempotencyCache(), Engine(outcome, code)
    engine.gate.set()
    await collect(cache, "t", request("r1"), engine)
    await collect(cache, "t", request("r2"), engine)
    assert engine.runs == 2


async def test_entries_expire():
    now = [0.0]
    cache, engine = IdempotencyCache(ttl_s=10, clock=lambda: now[0]), Engine()
    engine.gate.set()
    await collect(cache, "t", request("r1"), engine)
    now[0] = 11.0
    await collect(cache, "t", request("r2"), engine)
    assert engine.runs == 2


async def test_requests_without_a_key_always_run():
    cache, engine = IdempotencyCache(), Engine()
    engine.gate.set()
    await collect(cache, "t", request("r1", key=""), engine)
    await collect(cache, "t", request("r2", key=""), engine)
    assert engine.runs == 2


async def test_a_refusal_before_any_text_is_not_kept():
    cache, engine = IdempotencyCache(), Engine()

    async def refuse(send):
        engine.runs += 1
        finished = Finished("r", "error", error=errors.InvalidArgument("params.top_k", "bad"))
        await send(finished)
        return finished

    for rid in ("r1", "r2"):
        await cache.run("t", request(rid), collect_nothing, refuse)
    assert engine.runs == 2 and cache.bytes == 0 and cache.entries("t") == 0


async def collect_nothing(event):
    pass


async def test_one_tenant_filling_its_share_never_evicts_another_tenant_s_keys():
    cache, engine = IdempotencyCache(max_entries_per_tenant=10), Engine()
    engine.gate.set()
    await collect(cache, "victim", request("v1", key="keep-me"), engine)
    for n in range(500):
        await collect(cache, "noisy", request(f"n{n}", key=f"k{n}"), engine)
    assert cache.entries("noisy") == 10 and cache.entries("victim") == 1
    await collect(cache, "victim", request("v2", key="keep-me"), engine)
    assert engine.runs == 501  # replayed: the victim's key survived


async def test_bytes_are_bounded_per_tenant_and_in_all():
    cache = IdempotencyCache(max_tenant_bytes=20_000, max_bytes=50_000)

    def long_output(rid):
        async def run(send):
            for _ in range(10):
                await send(TokenText(rid, "x" * 1000))
            finished = Finished(rid, "stop")
            await send(finished)
            return finished
        return run

    for tenant in ("a", "b"):
        await cache.run(tenant, request(f"{tenant}0", key="first"), collect_nothing,
                        long_output(f"{tenant}0"))
    for n in range(50):  # "c" keeps adding entries of ~12 KB
        await cache.run("c", request(f"c{n}", key=f"k{n}"), collect_nothing,
                        long_output(f"c{n}"))
    assert cache.bytes <= 50_000
    assert cache.entries("a") == 1 and cache.entries("b") == 1  # under their share: kept
    assert cache.entries("c") == 1  # its own share (20 KB) holds one such entry
