"""The sizing arithmetic and the autoscaling signal: prefill- vs decode-bound, headroom, zone
survival, out fast and in slow (injected clock), and the demand meter's windows."""

import pytest
from pydantic import ValidationError

from services.common import errors
from services.scheduler.autoscale import (
    Autoscaler,
    ScalePolicy,
    TokenRates,
    size_replicas,
    survive_zone_loss,
)
from services.scheduler.demand import DemandMeter
from services.scheduler.placement import ReplicaState
from services.scheduler.placement_loop import (
    Capacity,
    PlacementSettings,
    demand_record,
    replica_capacity,
    total_demand,
)

CAPACITY = TokenRates(prefill_tokens_per_s=10_000, decode_tokens_per_s=1_000)


class Clock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_prefill_bound_and_decode_bound_are_sized_separately():
    prefill_heavy = size_replicas(TokenRates(45_000, 1_000), CAPACITY, headroom=0, zones=1,
                                  min_copies=1)
    assert (prefill_heavy.prefill_replicas, prefill_heavy.decode_replicas) == (4.5, 1.0)
    assert prefill_heavy.bound == "prefill" and prefill_heavy.replicas == 5
    decode_heavy = size_replicas(TokenRates(10_000, 7_000), CAPACITY, headroom=0, zones=1,
                                 min_copies=1)
    assert decode_heavy.bound == "decode" and decode_heavy.replicas == 7


def test_headroom_then_zone_survival_then_min_copies():
    sizing = size_replicas(TokenRates(0, 5_000), CAPACITY, headroom=0.2, zones=3, min_copies=1)
    assert sizing.with_headroom == 6  # 5 × 1.2
    assert sizing.zone_survival == 9  # 6 × 3 / 2
    assert sizing.replicas == 9
    idle = size_replicas(TokenRates(0, 0), CAPACITY, headroom=0.2, zones=3, min_copies=2)
    assert (idle.with_headroom, idle.zone_survival, idle.replicas) == (0, 0, 2)


def test_an_exact_fit_does_not_cost_a_replica_to_float_rounding():
    sizing = size_replicas(TokenRates(0, 0.1 * 30_000), CAPACITY, headroom=0, zones=1,
                           min_copies=0)
    assert sizing.replicas == 3


@pytest.mark.parametrize("needed", range(1, 40))
@pytest.mark.parametrize("zones", [2, 3, 4, 5])
def test_losing_the_fullest_zone_of_an_even_spread_keeps_what_is_needed(needed, zones):
    total = survive_zone_loss(needed, zones)
    fullest = -(-total // zones)
    assert total - fullest >= needed
    assert survive_zone_loss(needed, 1) == needed


def test_invalid_inputs_name_the_field():
    with pytest.raises(ValueError, match="capacity"):
        size_replicas(TokenRates(1, 1), TokenRates(0, 1), headroom=0, zones=1, min_copies=1)
    with pytest.raises(ValueError, match="zones"):
        size_replicas(TokenRates(1, 1), CAPACITY, headroom=0, zones=0, min_copies=1)


def test_scale_out_is_immediate_and_scale_in_waits_for_the_long_window_and_cool_down():
    clock = Clock()
    scaler = Autoscaler(ScalePolicy(headroom=0, zones=1, min_copies=1, scale_in_cooldown_s=300),
                        clock)
    quiet, busy = TokenRates(0, 1_000), TokenRates(0, 4_000)
    assert scaler.desired("m", quiet, quiet, CAPACITY) == 1
    clock.now += 1
    assert scaler.desired("m", busy, quiet, CAPACITY) == 4  # a burst: out at once
    clock.now += 10
    # The burst is over in the short window, but the long window still remembers it.
    assert scaler.desired("m", quiet, TokenRates(0, 3_000), CAPACITY) == 4
    clock.now += 400
    assert scaler.desired("m", quiet, TokenRates(0, 3_000), CAPACITY) == 3  # in, to the long
    clock.now += 10
    assert scaler.desired("m", quiet, quiet, CAPACITY) == 3  # cool-down since the last change
    clock.now += 300
    assert scaler.desired("m", quiet, quiet, CAPACITY) == 1


def test_a_new_leader_starts_from_the_fleet_serving_and_waits_a_cool_down_to_scale_in():
    """A failover must not undo a recent scale-out: the fresh state knows nothing of it."""
    clock = Clock()
    fresh = Autoscaler(ScalePolicy(headroom=0, zones=1, min_copies=1, scale_in_cooldown_s=300),
                       clock)
    quiet = TokenRates(0, 1_000)
    assert fresh.desired("m", quiet, quiet, CAPACITY, serving=4) == 4
    clock.now += 299
    assert fresh.desired("m", quiet, quiet, CAPACITY, serving=4) == 4
    clock.now += 1
    assert fresh.desired("m", quiet, quiet, CAPACITY, serving=4) == 1


def test_the_meter_averages_prefill_and_decode_over_sliding_windows():
    clock = Clock()
    meter = DemandMeter(max_window_s=600, clock=clock)
    clock.now += 600
    for _ in range(30):  # 30 s of 2 requests/s, 100 prompt and 10 completion tokens each
        meter.on_release("m", 100, 10)
        meter.on_release("m", 100, 10)
        clock.now += 1
    assert meter.rates("m", 30) == TokenRates(200.0, 20.0)
    assert meter.rates("m", 600) == TokenRates(200.0 * 30 / 600, 20.0 * 30 / 600)
    clock.now += 60
    assert meter.rates("m", 30) == TokenRates(0.0, 0.0)
    assert meter.models() == ["m"]
    clock.now += 600
    assert meter.models() == [] and meter.rates("other", 30) == TokenRates(0.0, 0.0)


def test_a_young_meter_averages_over_its_age_and_refuses_negative_counts():
    clock = Clock()
    meter = DemandMeter(max_window_s=600, clock=clock)
    meter.on_release("m", 1_000, 100)
    clock.now += 10
    assert meter.rates("m", 600) == TokenRates(100.0, 10.0)
    with pytest.raises(errors.InvalidArgument, match="completion_tokens"):
        meter.on_release("m", 1, -1)


def test_a_release_in_the_meters_first_second_counts():
    clock = Clock(1_000.5)
    meter = DemandMeter(max_window_s=600, clock=clock)
    clock.now = 1_000.9
    meter.on_release("m", 100, 10)
    clock.now = 1_004.5
    assert meter.rates("m", 600) == TokenRates(25.0, 2.5)


def test_the_meter_forgets_the_least_recent_model_beyond_its_bound():
    meter = DemandMeter(max_window_s=60, clock=Clock(), max_models=2)
    for model in ("a", "b", "a", "c"):
        meter.on_release(model, 1, 1)
    assert meter.models() == ["a", "c"]


def test_demand_from_every_scheduler_is_summed():
    clock = Clock()
    settings = PlacementSettings(scale_out_window_s=10, scale_in_window_s=100)
    meters = [settings.demand_meter(clock) for _ in range(2)]
    clock.now += 100
    meters[0].on_release("m", 1_000, 100)
    meters[1].on_release("m", 3_000, 300)
    clock.now += 1
    malformed = [{"schema": 2, "models": {"m": {"short": [1e9, 1e9]}}}, {"schema": 1},
                 {"schema": 1, "models": {"m": {"short": ["x", 1]}}}, "not a record"]
    total = total_demand([demand_record(m, settings) for m in meters] + malformed)
    assert total["m"]["short"] == TokenRates(400.0, 40.0)  # what cannot be read is left out
    assert total["m"]["long"] == TokenRates(40.0, 4.0)


def test_capacity_is_the_calibrated_median_else_the_gpu_types_default():
    settings = PlacementSettings(default_capacity={
        "H100": Capacity(prefill_tokens_per_s=20_000, decode_tokens_per_s=2_000),
        "*": Capacity(prefill_tokens_per_s=500, decode_tokens_per_s=100)})
    calibrated = [ReplicaState(f"r{i}", capacity={"m": (p, 10.0 * p)})
                  for i, p in enumerate((1.0, 2.0, 9.0))]
    assert replica_capacity("m", calibrated, settings) == TokenRates(2.0, 20.0)
    h100 = [ReplicaState("r1", gpu_type="H100"), ReplicaState("r2", gpu_type="H100"),
            ReplicaState("r3", gpu_type="cpu")]
    assert replica_capacity("m", h100, settings) == TokenRates(20_000, 2_000)
    assert replica_capacity("m", [ReplicaState("r", gpu_type="cpu")], settings) == \
        TokenRates(500, 100)


def test_placement_settings_name_the_field_and_the_limit():
    with pytest.raises(ValidationError, match="scale_in_window_s: must be >= scale_out_window_s"):
        PlacementSettings(scale_out_window_s=60, scale_in_window_s=30)
    with pytest.raises(ValidationError, match="load_retry_max_s: must be >= load_retry_s"):
        PlacementSettings(load_retry_s=60, load_retry_max_s=30)
    with pytest.raises(ValidationError, match="min_copies"):
        PlacementSettings(min_copies=0)
