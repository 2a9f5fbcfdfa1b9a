from services.scheduler.breakers import Breakers, BreakerSettings, BreakerState, CircuitBreaker
from services.scheduler.outcome import Outcome

SETTINGS = BreakerSettings(consecutive_failures=3, error_rate=0.5, min_requests=4, window_s=10,
                           cooldown_s=5)


def test_closed_open_half_open_closed():
    b = CircuitBreaker("replica", "a", SETTINGS)
    for t in range(3):
        assert b.available(t)
        b.record(True, t)
    assert b.state is BreakerState.OPEN and not b.available(4)
    assert b.available(7) and b.state is BreakerState.HALF_OPEN
    assert b.routed(7)  # the probe
    assert not b.available(7) and not b.routed(7)
    b.record(False, 8, probe=True)
    assert b.state is BreakerState.CLOSED and b.available(8)


def test_a_failed_probe_opens_it_again_for_a_new_cool_down():
    b = CircuitBreaker("replica", "a", SETTINGS)
    b.trip(0)
    assert b.available(5) and b.routed(5)
    b.record(True, 6, probe=True)
    assert b.state is BreakerState.OPEN
    assert not b.available(10) and b.available(11)


def test_success_resets_consecutive_but_the_error_rate_still_opens():
    b = CircuitBreaker("replica", "a", SETTINGS)
    for t, failed in enumerate([True, True, False, True, True, False, True]):
        b.record(failed, t)
        if b.state is BreakerState.OPEN:
            break
    assert b.state is BreakerState.OPEN and t == 3  # 3 of 4 failed > 50 %


def test_old_failures_leave_the_window():
    b = CircuitBreaker("replica", "a", SETTINGS)
    b.record(True, 0)
    b.record(True, 1)
    for t in (20, 21, 22):
        b.record(False, t)
    b.record(True, 23)
    assert b.state is BreakerState.CLOSED


def test_cancellations_do_not_judge_and_free_the_probe():
    breakers = Breakers(SETTINGS)
    breakers.replica("a").trip(0)
    assert breakers.available("a", "", 6)
    probes = breakers.routed("a", "", 6)
    assert probes.replica and not breakers.available("a", "", 6)
    breakers.record("a", "", Outcome.CANCELLED, probes, 7, [])
    assert breakers.state("a") is BreakerState.HALF_OPEN and breakers.available("a", "", 7)


def test_the_zone_opens_when_most_of_its_replicas_fail_and_a_probe_closes_it():
    one = BreakerSettings(consecutive_failures=1, cooldown_s=5)
    breakers = Breakers(one)
    zone = ["a", "b", "c"]
    fail = Outcome.FAILED_BEFORE_FIRST_TOKEN
    breakers.record("a", "z", fail, breakers.routed("a", "z", 0), 0, zone)
    assert breakers.zone_state("z") is BreakerState.CLOSED  # one of three
    breakers.record("b", "z", fail, breakers.routed("b", "z", 1), 1, zone)
    assert breakers.zone_state("z") is BreakerState.OPEN  # two of three
    assert not breakers.available("c", "z", 2)  # its healthy-looking replica too
    assert breakers.available("c", "z", 6)  # cool-down over: one probe into the zone
    probes = breakers.routed("c", "z", 6)
    assert probes.zone and not probes.replica
    assert not breakers.available("c", "z", 6)
    breakers.record("c", "z", Outcome.OK, probes, 7, zone)
    assert breakers.zone_state("z") is BreakerState.CLOSED


def test_replicas_without_a_zone_have_no_zone_breaker():
    breakers = Breakers(BreakerSettings(consecutive_failures=1))
    breakers.record("a", "", Outcome.FAILED_AFTER_FIRST_TOKEN, breakers.routed("a", "", 0), 0, [])
    assert breakers.zone_state("") is BreakerState.CLOSED
    assert breakers.available("b", "", 0)


def test_a_probe_never_judged_is_lost_after_its_timeout_and_another_goes():
    """A long generation (or a dead gateway) holds its verdict: the zone must not wait on it."""
    b = CircuitBreaker("zone", "z", SETTINGS)
    b.trip(0)
    assert b.available(5) and b.routed(5)
    assert not b.available(9.9)  # within probe_timeout_s: the probe is out
    assert b.available(10) and b.routed(10)  # lost: a second probe
    b.record(False, 11, probe=True)
    assert b.state is BreakerState.CLOSED
