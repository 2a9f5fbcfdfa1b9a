"""The sidecar's pure part: Triton's metrics page → load figures, etcd values, placement plans."""

from __future__ import annotations

import pytest

from backends.triton.replica_status import (
    ModelLoad,
    PlacementPlan,
    ReplicaIdentity,
    is_idle,
    load_report,
    parse_engine_metrics,
    plan_placement,
    probe_verdict,
    replica_record,
    restarts_within_budget,
)
from services.common.records import PlacementRecord

# Shaped like Triton's page: its own families, then the engines' (labels as the engines set them).
METRICS_PAGE = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="chat",version="1"} 12
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="chat",request_type="active",version="1"} 3
nv_trt_llm_request_metrics{model="chat",request_type="waiting",version="1"} 1
nv_trt_llm_request_metrics{model="chat",request_type="max",version="1"} 8
nv_trt_llm_request_metrics{model="chat",request_type="scheduled",version="1"} 3
nv_trt_llm_request_metrics{model="reference",request_type="active",version="1"} 0
nv_trt_llm_request_metrics{model="reference",request_type="waiting",version="1"} 0
nv_trt_llm_request_metrics{model="reference",request_type="max",version="1"} 32
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="chat",version="1"} 256
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="chat",version="1"} 200
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="chat",version="1"} 56
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="chat",version="1"} 32
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="reused",model="chat",version="1"} 7
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="chat",version="1"} 0.21
"""

IDENTITY = ReplicaIdentity("r1", "10.0.0.1:8001", "10.0.0.1:8002", "zone-a", "cpu", 8192)


def test_parses_the_trtllm_families_per_model_and_leaves_out_what_an_engine_lacks() -> None:
    loads = parse_engine_metrics(METRICS_PAGE)
    assert loads["chat"] == ModelLoad(kv_max_blocks=256, kv_free_blocks=200, kv_used_blocks=56,
                                      kv_reused_blocks=7, kv_tokens_per_block=32, active=3,
                                      waiting=1, max=8)
    # The reference engine without a KV cache: request counts only, no kv fields at all.
    assert loads["reference"].report() == {"active": 0, "waiting": 0, "max": 32}
    assert loads["reference"].kv_capacity() is None
    assert parse_engine_metrics("") == {}


def test_a_page_that_is_not_prometheus_text_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_engine_metrics("nv_trt_llm_request_metrics{model=chat} three\n")


def test_idle_means_nothing_running_or_waiting_anywhere() -> None:
    loads = parse_engine_metrics(METRICS_PAGE)
    assert not is_idle(loads)
    assert is_idle({"reference": loads["reference"]})
    assert is_idle({"m": ModelLoad(active=0, waiting=0)})
    assert not is_idle({"m": ModelLoad(active=0, waiting=2)})
    assert is_idle({"m": ModelLoad(kv_max_blocks=10)})  # no request counts: nothing to wait for


def test_load_report_has_the_contract_fields_of_served_models_only() -> None:
    loads = parse_engine_metrics(METRICS_PAGE)
    report = load_report("r1", 1700000000.5, loads, models=["chat"])
    assert report == {
        "schema": 1, "replica_id": "r1", "at": 1700000000.5,
        "models": {"chat": {"kv_max_blocks": 256, "kv_free_blocks": 200, "kv_used_blocks": 56,
                            "kv_reused_blocks": 7, "active": 3, "waiting": 1, "max": 8}},
    }


def test_record_carries_identity_models_versions_kv_and_errors() -> None:
    loads = parse_engine_metrics(METRICS_PAGE)
    record = replica_record(IDENTITY, True, {"reference": "1", "chat": "3"}, loads,
                            draining=False, placement_errors={"broken": "load failed: boom"},
                            capacity={"chat": (9000.0, 400.0), "not-loaded": (1.0, 1.0)},
                            version_ids={"chat": "sha256:" + "c" * 64, "gone": "sha256:x"})
    assert record == {
        "schema": 1, "replica_id": "r1", "grpc_endpoint": "10.0.0.1:8001",
        "metrics_endpoint": "10.0.0.1:8002", "zone": "zone-a", "gpu_type": "cpu",
        "gpu_memory_mib": 8192, "models": ["chat", "reference"],
        "versions": {"chat": "3", "reference": "1"},
        "version_ids": {"chat": "sha256:" + "c" * 64},
        "kv": {"chat": {"max_blocks": 256, "tokens_per_block": 32}},
        "capacity": {"chat": {"prefill_tokens_per_s": 9000.0, "decode_tokens_per_s": 400.0}},
        "ready": True, "healthy": True, "draining": False,
        "placement_errors": {"broken": "load failed: boom"},
    }


def test_record_is_unhealthy_when_triton_is_not_ready_or_serves_nothing() -> None:
    assert not replica_record(IDENTITY, False, {"chat": "1"}, {}, False, {})["healthy"]
    empty = replica_record(IDENTITY, True, {}, {}, False, {})
    assert empty["ready"] and not empty["healthy"]  # placement may fill it; routing skips it
    assert replica_record(IDENTITY, True, {"chat": "1"}, {}, True, {})["draining"] is True


def test_placement_values_are_validated_naming_the_field() -> None:
    ref = "chat@sha256:" + "a" * 64
    record = PlacementRecord(frozenset({"a", "b"}), 4, {"a": ref})
    assert PlacementRecord.decode(record.encode()) == record  # one codec, both ways
    assert record.encode() == {"schema": 2, "models": ["a", "b"], "generation": 4,
                               "versions": {"a": ref}}
    for raw, field in [
        ({"schema": 1, "models": [], "generation": 1}, "schema"),
        ({"schema": 2, "models": "a", "generation": 1}, "models"),
        ({"schema": 2, "models": [""], "generation": 1}, "models"),
        ({"schema": 2, "models": [], "generation": -1}, "generation"),
        ({"schema": 2, "models": [], "generation": True}, "generation"),
        ({"schema": 2, "models": ["a"], "generation": 1, "versions": {"b": ref}}, "versions"),
        ({"schema": 2, "models": ["a"], "generation": 1, "versions": {"a": "a@v1"}}, "versions"),
    ]:
        with pytest.raises(ValueError, match=field):
            PlacementRecord.decode(raw)


def test_plan_unloads_extras_first_then_loads_what_is_missing() -> None:
    target = PlacementRecord(frozenset({"a", "b"}), 1)
    # Memory is freed before more is taken: the load waits for the unload to end.
    assert plan_placement(target, ready=["b", "c"], busy=[], failed=[]) == PlacementPlan(
        unload=frozenset({"c"}))
    assert plan_placement(target, ready=["b", "c"], busy=["c"], failed=[],
                          unloading=["c"]) == PlacementPlan()
    assert plan_placement(target, ready=["b"], busy=[], failed=[]) == PlacementPlan(
        load=frozenset({"a"}))
    assert plan_placement(target, ready=["a", "b"], busy=[], failed=[]) == PlacementPlan()


def test_plan_leaves_busy_models_alone_so_nothing_is_unloaded_mid_load() -> None:
    target = PlacementRecord(frozenset({"b"}), 2)
    # "a" is mid-load (asked by an older target): neither unloaded nor loaded again until done.
    assert plan_placement(target, ready=["b"], busy=["a"], failed=[]) == PlacementPlan()
    assert plan_placement(target, ready=["a", "b"], busy=[], failed=[]) == PlacementPlan(
        unload=frozenset({"a"}))


def test_plan_does_not_retry_what_failed_for_this_target() -> None:
    target = PlacementRecord(frozenset({"a", "broken"}), 3)
    assert plan_placement(target, ready=["a", "stuck"], busy=[], failed=["broken", "stuck"]) == (
        PlacementPlan())


def test_a_gone_engine_restarts_at_once_and_silence_only_after_misses_in_a_row():
    assert probe_verdict(gone=True, answered=True, misses=0, max_misses=3) == (True, 0)
    assert probe_verdict(gone=False, answered=False, misses=0, max_misses=3) == (False, 1)
    assert probe_verdict(gone=False, answered=False, misses=1, max_misses=3) == (False, 2)
    assert probe_verdict(gone=False, answered=False, misses=2, max_misses=3) == (True, 0)
    # One answer in between (even an error about the probe) shows the process alive.
    assert probe_verdict(gone=False, answered=True, misses=2, max_misses=3) == (False, 0)


def test_an_engine_that_keeps_dying_runs_out_of_restarts_until_the_window_passes():
    history: list[float] = []
    for at in (0.0, 10.0, 20.0):
        allowed, history = restarts_within_budget(history, at, window_s=600, max_restarts=3)
        assert allowed
    allowed, history = restarts_within_budget(history, 30.0, window_s=600, max_restarts=3)
    assert not allowed and history == [0.0, 10.0, 20.0]
    allowed, history = restarts_within_budget(history, 605.0, window_s=600, max_restarts=3)
    assert allowed and history == [10.0, 20.0, 605.0]
