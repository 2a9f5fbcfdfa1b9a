"""Fitting the reference engine's step model to measurements."""

import json

import pytest

from backends.triton.calibration import fit_line, fit_profile
from backends.triton.reference_engine import StepTiming


def test_a_line_through_exact_points_is_recovered():
    assert fit_line([(1, 5.0), (2, 7.0), (4, 11.0)]) == pytest.approx((3.0, 2.0))
    with pytest.raises(ValueError, match="two different"):
        fit_line([(2, 1.0), (2, 3.0)])


def test_the_profile_reproduces_the_measured_physics():
    timing = StepTiming(prefill_us_per_token=400.0, decode_step_ms=40.0,
                        decode_step_ms_per_request=5.0)
    profile = fit_profile(
        model="m", version_id="sha256:" + "0" * 64, triton_model_name="t",
        prefill=[(n, 0.05 + timing.prefill_seconds(n)) for n in (16, 128, 512)],
        decode=[(b, timing.decode_step_seconds(b)) for b in (1, 2, 4, 8)],
        max_active_requests=8, kv_tokens_per_block=32, kv_blocks_per_request=2.0,
        kv_request_tokens=48,
    )
    fitted = StepTiming(**{k: float(v) for k, v in profile.reference_parameters().items()
                           if k != "max_active_requests"})
    assert fitted.prefill_us_per_token == pytest.approx(400.0, rel=1e-3)
    assert fitted.decode_step_ms == pytest.approx(40.0, rel=1e-3)
    assert fitted.decode_step_ms_per_request == pytest.approx(5.0, rel=1e-3)
    assert json.loads(profile.to_json())["schema"] == 1


def test_noise_on_a_flat_curve_never_gives_a_negative_cost():
    profile = fit_profile(
        model="m", version_id="v", triton_model_name="t",
        prefill=[(16, 0.10), (512, 0.09)], decode=[(1, 0.05), (8, 0.049)],
        max_active_requests=1, kv_tokens_per_block=32, kv_blocks_per_request=1.0,
        kv_request_tokens=10,
    )
    assert profile.prefill_us_per_token == 0.0 and profile.decode_step_ms_per_request == 0.0
    assert profile.token_rates() is None  # a zero prefill cost says nothing about the limit


def test_a_profile_reads_back_and_gives_one_replicas_token_rates():
    profile = fit_profile(
        model="m", version_id="v", triton_model_name="t",
        prefill=[(100, 0.01), (200, 0.02)], decode=[(1, 0.0105), (8, 0.014)],
        max_active_requests=8, kv_tokens_per_block=32, kv_blocks_per_request=2.0,
        kv_request_tokens=48,
    )
    assert type(profile).from_json(profile.to_json()) == profile
    prefill, decode = profile.token_rates()
    assert prefill == pytest.approx(10_000.0)  # 100 µs per prompt token
    assert decode == pytest.approx(8 / 0.014)  # a full batch of 8 every 14 ms
    with pytest.raises(ValueError, match="decode_step_ms"):
        type(profile).from_json(json.dumps({"schema": 1, "model": "m"}))
