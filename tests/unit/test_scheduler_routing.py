import pytest

from services.common import errors
from services.common.prefix import prompt_block_hashes
from services.scheduler.breakers import BreakerSettings, BreakerState
from services.scheduler.outcome import Outcome
from services.scheduler.routing import Policy, Router, RoutingConfig
from tests.unit.scheduler_builders import query, replica, report


def router(policy=Policy.KV_AWARE, **config) -> Router:
    return Router(RoutingConfig(policy=policy, **config))


def test_least_in_flight_wins_and_release_rebalances():
    r = router(Policy.LEAST_LOADED)
    replicas = [replica("a"), replica("b")]
    first = r.route(query(), replicas, {}, now=0)
    second = r.route(query(), replicas, {}, now=0)
    assert {first.replica.replica_id, second.replica.replica_id} == {"a", "b"}
    assert r.release(first.reservation_id, Outcome.OK, now=0) is not None
    assert r.route(query(), replicas, {}, now=0).replica == first.replica
    assert r.release(first.reservation_id, Outcome.OK, now=0) is None  # idempotent


def test_only_routable_replicas_and_the_error_names_the_filter():
    r = router()
    replicas = [replica("a", healthy=False), replica("b", models=("other",)),
                replica("d", draining=True), replica("c")]
    assert r.route(query(), replicas, {}, 0).replica.replica_id == "c"
    with pytest.raises(errors.Unavailable, match="not already tried"):
        r.route(query(exclude=["c"]), replicas, {}, 0)
    with pytest.raises(errors.Unavailable, match="serves the model"):
        r.route(query(), [], {}, 0)


def test_unroutable_names_the_first_request_independent_filter_each_replica_fails():
    r = router(breakers=BreakerSettings(consecutive_failures=1, cooldown_s=5))
    replicas = [replica("ok"), replica("sick", healthy=False),
                replica("leaving", draining=True, healthy=False), replica("silent"),
                replica("tripped"), replica("other", models=("x",))]
    loads = {rid: report(rid, 10.0) for rid in ("ok", "tripped", "other")}
    loads["silent"] = report("silent", 0.0)
    res = r.route(query(exclude=["ok", "silent", "other"]), replicas, loads, 10.0)
    r.release(res.reservation_id, Outcome.FAILED_BEFORE_FIRST_TOKEN, 10.0, replicas)
    assert r.unroutable(replicas, loads, now=10.5) == {
        "sick": "healthy", "leaving": "healthy", "silent": "load report fresh",
        "tripped": "circuit breaker not open"}  # serving another model is no fault of its own


def test_reservations_expire():
    r = router()
    r.route(query(hold_s=5), [replica("a")], {}, now=0)
    assert r.in_flight() == {"a": 1}
    r.route(query(hold_s=5), [replica("a")], {}, now=6)
    assert r.in_flight() == {"a": 1}


def test_routing_prefers_the_replica_holding_the_prompts_prefix():
    r = router()
    replicas = [replica(rid) for rid in ("a", "b", "c", "d")]
    system = "You are a careful assistant who answers in French. " * 20
    first = r.route(query(hashes=prompt_block_hashes(system + "Question one?")), replicas, {}, 0)
    r.release(first.reservation_id, Outcome.OK, 0)
    for n in range(5):  # other traffic spreads, the shared prefix stays where it was served
        other = r.route(query(hashes=prompt_block_hashes(f"unrelated {n} " * 30)), replicas, {}, 0)
        r.release(other.reservation_id, Outcome.OK, 0)
        again = r.route(query(hashes=prompt_block_hashes(system + f"Question {n}?")),
                        replicas, {}, 0)
        assert again.replica == first.replica
        r.release(again.reservation_id, Outcome.OK, 0)


def test_salted_prompts_get_no_prefix_affinity_from_another_tenants():
    """Issue 15, class 9: hashed with the tenant's salt (plan isolate_prefix_cache), tenant B's
    identical prompt matches nothing tenant A was routed; unsalted (shared) prompts match."""
    r = router()
    replicas = [replica(rid) for rid in ("a", "b", "c", "d")]
    prompt = "You are a careful assistant who answers in French. " * 20 + "Question?"
    for salt in ("tenant-a", ""):
        routed = r.route(query(hashes=prompt_block_hashes(prompt, salt)), replicas, {}, 0)
        r.release(routed.reservation_id, Outcome.OK, 0)
    chain = len(prompt_block_hashes(prompt))
    assert r.prefix.matches("m", prompt_block_hashes(prompt, "tenant-b")) == {}
    assert list(r.prefix.matches("m", prompt_block_hashes(prompt, "tenant-a")).values()) == [chain]
    assert list(r.prefix.matches("m", prompt_block_hashes(prompt)).values()) == [chain]
    assert prompt_block_hashes(prompt, "tenant-a") != prompt_block_hashes(prompt)


def test_a_full_queue_outweighs_prefix_affinity():
    r = router()
    replicas = [replica("a"), replica("b")]
    hashes = prompt_block_hashes("shared system prompt " * 40)
    held = r.route(query(hashes=hashes), replicas, {}, 0).replica.replica_id
    other = "b" if held == "a" else "a"
    loads = {held: report(held, 0, free=2, active=8, waiting=20), other: report(other, 0)}
    assert r.route(query(hashes=hashes), replicas, loads, 0.1).replica.replica_id == other


def test_reservations_spread_concurrent_routes_before_the_next_load_report():
    r = router()
    replicas = [replica(rid) for rid in ("a", "b", "c", "d")]
    loads = {x.replica_id: report(x.replica_id, 0.0) for x in replicas}  # all idle at t=0
    chosen = [r.route(query(), replicas, loads, 0.1).replica.replica_id for _ in range(8)]
    assert sorted(chosen) == ["a", "a", "b", "b", "c", "c", "d", "d"]
    # Once a report counts them, reservations made before it are not counted twice: "a" says
    # one of its two finished, the others still have two each (not yet reported).
    loads["a"] = report("a", 0.2, active=1)
    assert r.route(query(), replicas, loads, 0.3).replica.replica_id == "a"


def test_round_robin_rotates_over_the_filtered_candidates():
    r = router(Policy.ROUND_ROBIN)
    replicas = [replica("c"), replica("a"), replica("b"), replica("x", healthy=False)]
    loads = {"a": report("a", 0, active=50)}  # ignored by round robin
    picked = [r.route(query(), replicas, loads, 0).replica.replica_id for _ in range(6)]
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_ignores_prefix_and_kv():
    r = router(Policy.LEAST_LOADED)
    replicas = [replica("a"), replica("b")]
    hashes = prompt_block_hashes("shared " * 100)
    loads = {"a": report("a", 0, free=100, active=3), "b": report("b", 0, free=1, active=1)}
    assert r.route(query(hashes=hashes), replicas, loads, 0).replica.replica_id == "b"
    assert r.prefix.blocks("m") == 0  # the policy keeps no prefix index


def test_a_stale_load_report_takes_the_replica_out_and_a_fresh_one_back():
    r = router()
    replicas = [replica("a"), replica("b")]
    loads = {"a": report("a", 0.0), "b": report("b", 2.0)}
    for _ in range(3):
        assert r.route(query(), replicas, loads, now=2.1).replica.replica_id == "b"
    loads["a"] = report("a", 2.2)
    assert "a" in {r.route(query(), replicas, loads, 2.3).replica.replica_id for _ in range(4)}


def test_every_report_stale_routes_on_the_records_alone():
    """etcd away: the load feed stops everywhere at once; that is no reason to refuse traffic."""
    r = router()
    loads = {"a": report("a", 0.0), "b": report("b", 0.0)}
    assert r.route(query(), [replica("a"), replica("b")], loads, now=30).replica.replica_id


def test_zone_match_is_preferred():
    r = router()
    replicas = [replica("a", zone="z1"), replica("b", zone="z2")]
    assert r.route(query(zone="z2"), replicas, {}, 0).replica.replica_id == "b"


def test_failures_reported_on_release_open_the_breaker_and_a_probe_closes_it():
    r = router(breakers=BreakerSettings(consecutive_failures=2, cooldown_s=5))
    replicas = [replica("a"), replica("b")]
    for _ in range(2):
        res = r.route(query(exclude=["b"]), replicas, {}, 0)
        r.release(res.reservation_id, Outcome.FAILED_BEFORE_FIRST_TOKEN, 0, replicas)
    assert r.breakers.state("a") is BreakerState.OPEN
    assert {r.route(query(), replicas, {}, 1).replica.replica_id for _ in range(3)} == {"b"}
    probe = r.route(query(exclude=["b"]), replicas, {}, 6)  # cool-down over: one probe
    assert probe.probes.replica and r.breakers.state("a") is BreakerState.HALF_OPEN
    with pytest.raises(errors.Unavailable, match="circuit breaker"):
        r.route(query(exclude=["b"]), replicas, {}, 6)  # only one probe at a time
    r.release(probe.reservation_id, Outcome.OK, 7, replicas)
    assert r.breakers.state("a") is BreakerState.CLOSED


def test_an_expired_probe_lets_another_through():
    r = router(breakers=BreakerSettings(consecutive_failures=1, cooldown_s=1))
    res = r.route(query(), [replica("a")], {}, 0)
    r.release(res.reservation_id, Outcome.FAILED_AFTER_FIRST_TOKEN, 0)
    probe = r.route(query(hold_s=2), [replica("a")], {}, 2)
    assert probe.probes.replica
    assert r.route(query(), [replica("a")], {}, 5).probes.replica  # the first probe expired


def test_cache_spread_puts_new_prefixes_where_they_evict_least():
    """Twelve long system prompts, each first seen while the others' requests have finished: by
    free KV and queue alone the replicas look alike (cached blocks count as free), so the lowest
    id takes every new prefix; the cache_spread scorer deals them out evenly."""
    replicas = [replica(rid) for rid in ("a", "b", "c", "d")]
    loads = {x.replica_id: report(x.replica_id, 0.0) for x in replicas}

    def owners(weight):
        weights = {"prefix": 3.0, "kv_free": 2.0, "queue": 2.0, "cache_spread": weight}
        r = router(weights=weights)
        chosen = {}
        for k in range(12):
            hashes = prompt_block_hashes(f"system prompt {k}: be brief. " * 40)
            reservation = r.route(query(hashes=hashes), replicas, loads, 0.1)
            r.release(reservation.reservation_id, Outcome.OK, 0.1)
            chosen[k] = reservation.replica.replica_id
        return sorted(chosen.values())

    assert owners(0.0) == ["a"] * 12
    assert owners(1.0) == ["a", "a", "a", "b", "b", "b", "c", "c", "c", "d", "d", "d"]


def test_a_load_report_with_impossible_figures_counts_as_unknown_and_still_routes():
    from services.scheduler.inventory import LoadReport

    broken = LoadReport.from_record("a", {"models": {"m": {
        "kv_max_blocks": -1, "kv_free_blocks": -5, "active": -2, "waiting": "x", "max": -8}}},
        received_at=0.0)
    load = broken.models["m"]
    assert (load.kv_max_blocks, load.kv_free_blocks, load.active, load.max) == (
        None, None, None, None)
    router = Router(RoutingConfig(policy=Policy.KV_AWARE))
    chosen = router.route(query("m"), [replica("a", models=("m",))], {"a": broken}, now=0.5)
    assert chosen.replica.replica_id == "a"
