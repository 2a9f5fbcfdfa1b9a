"""The gateway's own routing when no scheduler answers: which replica it picks (healthy, not
draining, serving the version, fresh load, breaker closed; least loaded), its breakers, and
`ResilientRouting` switching to the fallback and back, counted and releasing to the right side."""

from __future__ import annotations

import asyncio

import pytest

from services.common import errors
from services.common.breakers import BreakerSettings, BreakerState
from services.common.outcome import Outcome
from services.common.records import LoadReport, ModelLoad, ReplicaRecord
from services.gateway.fallback import (
    FALLBACK_PREFIX,
    FALLBACK_ROUTES,
    FallbackConfig,
    FallbackRouter,
    ResilientRouting,
)
from services.gateway.peers import Route, SchedulersAway

MODEL = "demo-0123456789ab"


def replica(replica_id: str, *, models=(MODEL,), healthy=True, draining=False,
            zone="") -> ReplicaRecord:
    return ReplicaRecord(replica_id, f"{replica_id}:8001", zone=zone, models=frozenset(models),
                         ready=True, healthy=healthy, draining=draining)


def report(replica_id: str, at: float, active: int = 0, waiting: int = 0,
           max_: int | None = 8) -> LoadReport:
    return LoadReport(replica_id, at, {MODEL: ModelLoad(active=active, waiting=waiting, max=max_)})


def test_pick_keeps_only_replicas_that_may_serve_the_version():
    router = FallbackRouter(FallbackConfig())
    replicas = [replica("a", healthy=False), replica("b", draining=True),
                replica("c", models=("other",)), replica("d"), replica("e")]
    loads = {"e": report("e", at=0.0), "d": report("d", at=9.5)}  # e's report is stale
    assert router.pick(replicas, loads, MODEL, [], now=10.0).replica_id == "d"
    with pytest.raises(errors.Unavailable):
        router.pick(replicas, loads, MODEL, ["d"], now=10.0)


def test_every_report_stale_keeps_all_as_the_scheduler_does():
    """Static stability: when no report anywhere is fresh, the feed broke, not every replica."""
    router = FallbackRouter(FallbackConfig())
    loads = {"a": report("a", at=0.0), "b": report("b", at=0.0)}
    assert router.pick([replica("a"), replica("b")], loads, MODEL, [], now=60.0).replica_id == "a"


def test_least_loaded_by_own_in_flight_plus_last_report():
    router = FallbackRouter(FallbackConfig(), zone="z2")
    replicas = [replica("a", zone="z1"), replica("b", zone="z2"), replica("c", zone="z1")]
    loads = {r: report(r, at=10.0) for r in ("a", "b", "c")}
    # Even: the gateway's own zone, then the id.
    assert router.pick(replicas, loads, MODEL, [], now=10.0).replica_id == "b"
    router.routed("b", 10.0, chosen_here=True)
    assert router.pick(replicas, loads, MODEL, [], now=10.0).replica_id == "a"
    # The engine's own queue counts too: 8 running of max 8 weigh as one in-flight.
    loads["a"] = report("a", at=10.0, active=8)
    router.routed("c", 10.0, chosen_here=True)
    router.routed("c", 10.0, chosen_here=True)
    # a: 0 + 8/8, b: 1, c: 2 → a and b even, b in the gateway's zone.
    assert router.pick(replicas, loads, MODEL, [], now=10.0).replica_id == "b"
    router.routed("b", 10.0, chosen_here=True)
    assert router.pick(replicas, loads, MODEL, [], now=10.0).replica_id == "a"


def test_breaker_opens_on_failures_and_probes_after_cooldown():
    settings = BreakerSettings(consecutive_failures=2, cooldown_s=5.0)
    router = FallbackRouter(FallbackConfig(breaker=settings))
    replicas = [replica("a"), replica("b")]
    for _ in range(2):
        router.released(router.routed("a", 0.0, chosen_here=True),
                        Outcome.FAILED_BEFORE_FIRST_TOKEN, 0.0)
    assert router.breaker_state("a") is BreakerState.OPEN
    assert router.pick(replicas, {}, MODEL, [], now=1.0).replica_id == "b"
    router.routed("b", 1.0, chosen_here=True)  # b now busier: a would win, but it is open
    assert router.pick(replicas, {}, MODEL, [], now=1.0).replica_id == "b"
    # After the cool-down one probe goes to a; its success closes the breaker.
    assert router.pick(replicas, {}, MODEL, [], now=6.0).replica_id == "a"
    probe = router.routed("a", 6.0, chosen_here=True)
    assert probe.probe
    router.released(probe, Outcome.OK, 7.0)
    assert router.breaker_state("a") is BreakerState.CLOSED
    assert router.in_flight == {"b": 1}


class FakeSchedulers:
    """A SchedulerClient whose answer the test sets: a route, away, or a refusal."""

    def __init__(self):
        self.answer: Exception | None = None
        self.hang = False
        self.delay_s = 0.0
        self.calls = 0
        self.released: list[str] = []

    async def route(self, triton_model_name, version_id, request_id, hold_s, exclude, *,
                    prefix_hashes=(), prompt_tokens=0, kv_blocks=((), 0)):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(60)
        await asyncio.sleep(self.delay_s)
        if self.answer is not None:
            raise self.answer
        return Route("a", "a:8001", f"sched-{self.calls}")

    async def release_route(self, reservation_id, outcome=Outcome.UNREPORTED,
                            completion_tokens=0):
        self.released.append(reservation_id)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def routing(schedulers: FakeSchedulers, clock: Clock, budget_s: float = 1.0):
    router = FallbackRouter(FallbackConfig(budget_s=budget_s, retry_s=0.5))
    replicas = [replica("a"), replica("b")]
    return ResilientRouting(schedulers, router, lambda: replicas, dict, clock), router


async def test_falls_back_when_no_scheduler_answers_and_returns_when_one_does():
    schedulers, clock = FakeSchedulers(), Clock()
    resilient, router = routing(schedulers, clock)
    first = await resilient.route(MODEL, "v", "r1", 10.0, [])
    assert first.reservation_id == "sched-1" and not resilient.degraded
    before = FALLBACK_ROUTES._value.get()
    schedulers.answer = SchedulersAway("no scheduler answered (UNAVAILABLE)")
    second = await resilient.route(MODEL, "v", "r2", 10.0, [])
    assert second.reservation_id.startswith(FALLBACK_PREFIX) and resilient.degraded
    assert second.replica_id == "b"  # a holds the scheduler's route
    # Within retry_s the schedulers are not asked again.
    third = await resilient.route(MODEL, "v", "r3", 10.0, [])
    assert schedulers.calls == 2 and third.reservation_id.startswith(FALLBACK_PREFIX)
    assert FALLBACK_ROUTES._value.get() - before == 2
    assert router.in_flight == {"a": 2, "b": 1}
    # A scheduler answers again: the next route after retry_s goes to it and ends the fallback.
    schedulers.answer = None
    clock.now += 0.6
    fourth = await resilient.route(MODEL, "v", "r4", 10.0, [])
    assert fourth.reservation_id == "sched-3" and not resilient.degraded
    for route in (first, second, third, fourth):
        await resilient.release_route(route.reservation_id, Outcome.OK)
    assert schedulers.released == ["sched-1", "sched-3"]  # the gateway's own stay here
    assert router.in_flight == {}


async def test_a_scheduler_that_does_not_answer_in_the_budget_is_away():
    schedulers, clock = FakeSchedulers(), Clock()
    resilient, _ = routing(schedulers, clock, budget_s=0.05)
    schedulers.hang = True
    route = await resilient.route(MODEL, "v", "r1", 10.0, [])
    assert route.reservation_id.startswith(FALLBACK_PREFIX) and resilient.degraded


async def test_a_grant_that_comes_after_the_budget_is_released_not_leaked():
    schedulers, clock = FakeSchedulers(), Clock()
    resilient, _ = routing(schedulers, clock, budget_s=0.05)
    schedulers.delay_s = 0.2  # the scheduler is slow, not away: it grants after the budget
    route = await resilient.route(MODEL, "v", "r1", 10.0, [])
    assert route.reservation_id.startswith(FALLBACK_PREFIX)
    async with asyncio.timeout(5):
        while schedulers.released != ["sched-1"]:
            await asyncio.sleep(0.01)


async def test_a_schedulers_refusal_is_not_overridden():
    """"No healthy replica" from a scheduler that answered is its verdict, not an outage."""
    schedulers, clock = FakeSchedulers(), Clock()
    resilient, _ = routing(schedulers, clock)
    schedulers.answer = errors.Unavailable("no healthy replica serves demo")
    with pytest.raises(errors.Unavailable) as caught:
        await resilient.route(MODEL, "v", "r1", 10.0, [])
    assert not isinstance(caught.value, SchedulersAway) and not resilient.degraded
