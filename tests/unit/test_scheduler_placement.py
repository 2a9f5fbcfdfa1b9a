"""Placement: memory never exceeded, copies and roles, zone spread, minimal churn, drained
replicas left alone, failed loads backed off."""

from services.registry.catalog import ModelEntry
from services.registry.manifest import ModelVersion
from services.registry.rollout import Routing
from services.scheduler.placement import (
    LoadBackoff,
    ReplicaState,
    WantedModel,
    model_memory,
    place,
    version_refs,
    wanted_models,
)


def replica(rid: str, zone: str = "a", memory: int = 80_000, loaded=(), **kw) -> ReplicaState:
    return ReplicaState(rid, zone=zone, gpu_memory_mib=memory, loaded=frozenset(loaded), **kw)


def want(model: str, memory: int, copies: int = 1, role: str = "production") -> WantedModel:
    return WantedModel(model, memory, copies, role)


def version(name: str, vid: str, memory: int) -> ModelVersion:
    """A version whose Triton model is `<name>-<vid>` (vid stands for the digest's hex)."""
    return ModelVersion(vid, {"name": name, "engine": {"gpu_memory_mib": memory}})


def entry(name: str, routing: Routing, *versions: ModelVersion) -> ModelEntry:
    return ModelEntry(name, {v.version_id: v for v in versions}, routing)


def used(decision, rid: str, sizes: dict[str, int]) -> int:
    return sum(sizes[m] for m in decision.models[rid])


def test_memory_is_never_exceeded_and_what_does_not_fit_is_a_shortfall():
    replicas = [replica("r1", memory=40_000), replica("r2", memory=40_000)]
    wanted = [want("big", 30_000, copies=2), want("mid", 20_000, copies=2)]
    decision = place(replicas, wanted)
    sizes = {"big": 30_000, "mid": 20_000}
    for rid in ("r1", "r2"):
        assert used(decision, rid, sizes) <= 40_000
    assert decision.models == {"r1": {"big"}, "r2": {"big"}}
    assert decision.shortfalls == {"mid": 2}


def test_best_fit_packs_so_that_a_large_model_still_finds_room():
    replicas = [replica("r1", memory=40_000), replica("r2", memory=24_000)]
    # Largest first, each into the tightest replica it fits: small goes to r2's leftover.
    wanted = [want("large", 40_000), want("small", 20_000)]
    decision = place(replicas, wanted)
    assert decision.models == {"r1": {"large"}, "r2": {"small"}}
    assert decision.shortfalls == {}


def test_a_replica_reporting_no_memory_takes_only_models_that_state_none():
    decision = place([replica("r1", memory=0)], [want("gpu", 1_000), want("cpu", 0)])
    assert decision.models == {"r1": {"cpu"}}
    assert decision.shortfalls == {"gpu": 1}


def test_min_copies_previous_canary_and_shadow_from_the_routing():
    chat = entry(
        "chat",
        Routing(revision=3, production="v2", previous="v1", canary="v3", shadow="v4"),
        version("chat", "v1", 10), version("chat", "v2", 10), version("chat", "v3", 10),
        version("chat", "v4", 10),
        version("chat", "v5", 10),  # registered but routed nowhere: not placed
    )
    wanted = {w.triton_model: w for w in wanted_models([chat], {"chat-v2": 3}, min_copies=2)}
    assert {n: (w.copies, w.role) for n, w in wanted.items()} == {
        "chat-v2": (3, "production"), "chat-v1": (1, "previous"), "chat-v3": (1, "canary"),
        "chat-v4": (1, "shadow"),
    }
    replicas = [replica(f"r{i}", memory=100) for i in range(4)]
    decision = place(replicas, wanted.values())
    copies = {m: sum(m in models for models in decision.models.values()) for m in wanted}
    assert copies == {"chat-v2": 3, "chat-v1": 1, "chat-v3": 1, "chat-v4": 1}
    assert version_refs([chat])["chat-v4"] == "chat@v4"  # what the replica is told to fetch


def test_each_version_is_its_own_model_and_one_in_two_roles_takes_the_highest():
    a = entry("a", Routing(production="va", shadow="va"), version("a", "va", 3))
    b = entry("b", Routing(production="vb", previous="vc"), version("b", "vb", 5),
              version("b", "vc", 7))
    wanted = {w.triton_model: w for w in wanted_models([a, b], {}, min_copies=2)}
    assert wanted["a-va"] == WantedModel("a-va", 3, 2, "production")
    assert wanted["b-vc"] == WantedModel("b-vc", 7, 1, "previous")
    assert model_memory([a, b]) == {"a-va": 3, "b-vb": 5, "b-vc": 7}


def test_production_is_placed_before_shadow_when_memory_is_short():
    decision = place([replica("r1", memory=10)],
                     [want("shadow", 10, role="shadow"), want("prod", 10)])
    assert decision.models == {"r1": {"prod"}}
    assert decision.shortfalls == {"shadow": 1}


def test_copies_spread_across_zones():
    replicas = [replica("a1", "a"), replica("a2", "a"), replica("b1", "b"), replica("c1", "c")]
    decision = place(replicas, [want("m", 10, copies=3)])
    zones = sorted(r.zone for r in replicas if "m" in decision.models[r.replica_id])
    assert zones == ["a", "b", "c"]


def test_a_new_copy_avoids_the_zone_that_already_has_one():
    replicas = [replica("a1", "a", loaded={"m"}), replica("a2", "a"), replica("b1", "b")]
    decision = place(replicas, [want("m", 10, copies=2)])
    assert decision.models == {"a1": {"m"}, "a2": set(), "b1": {"m"}}


def test_minimal_churn_keeps_loaded_and_pending_models_and_moves_nothing():
    # "m" sits in a crowded zone; spreading would be tidier, but nothing moves to tidy up.
    replicas = [replica("a1", "a", loaded={"m", "x"}), replica("a2", "a", loaded={"m"}),
                replica("b1", "b")]
    decision = place(replicas, [want("m", 10, copies=1), want("n", 10)],
                     pending={"b1": ["n"]}, memory={"x": 10})
    assert decision.models == {"a1": {"m", "x"}, "a2": {"m"}, "b1": {"n"}}
    assert decision.evicted == []


def test_an_unwanted_model_is_unloaded_only_when_its_memory_is_needed():
    sizes = {"old": 20, "tiny": 5}
    roomy = place([replica("r1", memory=40, loaded={"old", "tiny"})], [want("new", 10)],
                  memory=sizes)
    assert roomy.models == {"r1": {"old", "tiny", "new"}} and roomy.evicted == []
    tight = place([replica("r1", memory=30, loaded={"old", "tiny"})], [want("new", 10)],
                  memory=sizes)
    assert tight.models == {"r1": {"tiny", "new"}}  # the largest unwanted one makes room
    assert tight.evicted == [("r1", "old")]


def test_a_wanted_model_is_never_evicted_for_another():
    decision = place([replica("r1", memory=30, loaded={"keep"})],
                     [want("keep", 25), want("new", 10)])
    assert decision.models == {"r1": {"keep"}}
    assert decision.shortfalls == {"new": 1} and decision.evicted == []


def test_draining_and_unhealthy_replicas_get_nothing_new_and_lose_nothing():
    replicas = [replica("d", loaded={"m"}, draining=True), replica("u", healthy=False),
                replica("ok")]
    decision = place(replicas, [want("m", 10, copies=3), want("n", 10)],
                     pending={"u": ["old"]})
    assert decision.models == {"d": {"m"}, "u": {"old"}, "ok": {"m", "n"}}
    assert decision.shortfalls == {"m": 2}  # the draining copy does not count


def test_a_blocked_pair_is_skipped_and_the_model_goes_elsewhere():
    replicas = [replica("r1"), replica("r2", memory=50_000)]
    decision = place(replicas, [want("m", 10)], pending={"r1": ["m"]},
                     blocked={("r1", "m")})
    assert decision.models == {"r1": set(), "r2": {"m"}}


def test_record_fields_from_the_sidecar():
    state = ReplicaState.from_record({
        "schema": 1, "replica_id": "r1", "zone": "z", "gpu_memory_mib": 81_920, "gpu_type": "H100",
        "models": ["a"], "draining": True, "healthy": True, "placement_errors": {"b": "boom"},
        "capacity": {"a": {"prefill_tokens_per_s": 1000, "decode_tokens_per_s": 100}},
        "grpc_endpoint": "x:1",
    })
    assert state == ReplicaState("r1", "z", 81_920, frozenset({"a"}), frozenset({"b"}), True,
                                 True, "H100", {"a": (1000.0, 100.0)})
    assert not state.eligible


def test_failed_loads_back_off_doubling_and_are_not_retried_hot():
    backoff = LoadBackoff(initial_s=30, max_s=100)
    failed = replica("r1", failed=frozenset({"m"}))
    assert backoff.observe([failed], {"r1": ["m"]}, now=0) == [("r1", "m")]
    assert backoff.blocked(1) == {("r1", "m")}
    # Placement drops it; the error still shows, but it is not ours now: nothing new.
    assert backoff.observe([failed], {"r1": []}, now=5) == []
    for now in (10, 20, 29):  # every round inside the delay keeps it blocked
        decision = place([failed], [want("m", 10)], pending={"r1": []},
                         blocked=backoff.blocked(now))
        assert decision.models == {"r1": set()}
    assert backoff.blocked(30) == set()  # retried once the delay is over...
    assert backoff.observe([failed], {"r1": ["m"]}, now=31) == [("r1", "m")]
    assert backoff.blocked(31 + 59) == {("r1", "m")}  # ...and the next delay is twice as long
    backoff.observe([failed], {"r1": ["m"]}, now=200)
    assert backoff.blocked(200 + 99) and not backoff.blocked(200 + 100)  # capped at max_s


def test_a_successful_load_or_a_vanished_replica_forgets_the_failures():
    backoff = LoadBackoff(initial_s=30, max_s=600)
    backoff.observe([replica("r1", failed=frozenset({"m"}))], {"r1": ["m"]}, now=0)
    backoff.observe([replica("r1", loaded={"m"})], {"r1": ["m"]}, now=1)
    assert backoff.blocked(2) == set()
    backoff.observe([replica("r1", failed=frozenset({"m"}))], {"r1": ["m"]}, now=3)
    backoff.observe([], {}, now=4)
    assert backoff.blocked(5) == set()
