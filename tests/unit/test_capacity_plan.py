"""`meshctl capacity plan`: the arithmetic shown step by step, the example profile, and profile
validation naming the field and the limit."""

import pathlib
import string

import pytest
from typer.testing import CliRunner

from meshctl.capacity import Lengths, ProfileError, capacity_app, load_profile, plan

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "capacity" / "example.toml"
runner = CliRunner()

PROFILE = string.Template("""
[traffic]
peak_qps = 10
prompt_tokens = { mean = 2000, p95 = 6000 }
output_tokens = { mean = 200, p95 = 800 }

[gpu]
name = "test-gpu"
memory_gib = 40
prefill_tokens_per_s = 5000
decode_tokens_per_s = 1000
$price

[model]
memory_gib_per_copy = $memory

[fleet]
zones = $zones
headroom = 0.25
min_copies = 1

[slo]
ttft_p95_s = $ttft
""")


def write(tmp_path: pathlib.Path, *, memory=30, zones=2, ttft=2.0, price="") -> pathlib.Path:
    path = tmp_path / "profile.toml"
    path.write_text(PROFILE.substitute(memory=memory, zones=zones, ttft=ttft, price=price))
    return path


def invoke(path: pathlib.Path):
    return runner.invoke(capacity_app, ["plan", "--profile", str(path)])


def test_the_plan_shows_each_step_of_the_arithmetic(tmp_path):
    result = invoke(write(tmp_path, price="price_per_hour = 3.0"))
    assert result.exit_code == 0, result.output
    for step in (
        "prefill: 10 req/s × 2,000 tokens = 20,000 tokens/s",
        "decode:  10 req/s × 200 tokens = 2,000 tokens/s",
        "GPUs per copy: ceil(30 GiB ÷ 40 GiB) = 1",
        "for prefill: 20,000 ÷ 5,000 = 4.00",
        "for decode:  2,000 ÷ 1,000 = 2.00",
        "the larger: 4.00 (prefill-bound)",
        "with 25% headroom: 4.00 × 1.25 = 5.00 → 5",
        "surviving the loss of 1 of 2 zones: 5 × 2 ÷ 1 = 10.00 → 10",
        "final: 10 replicas = 10 GPUs, about 5 per zone",
        "6,000 ÷ 5,000 = 1.200 s ≤ target 2 s: met",
        "10 GPUs × $3.00/h = $30.00/h, $21,900/month (730 h)",
    ):
        assert step in result.output, (step, result.output)


def test_a_copy_larger_than_one_gpu_takes_several(tmp_path):
    result = plan(load_profile(write(tmp_path, memory=100, zones=1)))
    assert result.gpus_per_copy == 3
    assert result.sizing.capacity.prefill_tokens_per_s == 15_000
    assert result.sizing.replicas == 2  # 20,000 ÷ 15,000 = 1.33, × 1.25 = 1.67 → 2
    assert result.gpus == 6


def test_an_unreachable_ttft_target_fails_the_plan_and_says_why(tmp_path):
    result = invoke(write(tmp_path, ttft=0.5))
    assert result.exit_code == 1
    assert "NOT MET" in result.output and "More replicas cannot fix" in result.output


def test_the_example_profile_plans(tmp_path):
    result = invoke(EXAMPLE)
    assert result.exit_code == 0, result.output
    assert "decode-bound" in result.output and "final: 11 replicas" in result.output


def test_a_histogram_gives_the_mean_and_p95():
    lengths = Lengths(histogram=[(100, 0.90), (1000, 0.05), (5000, 0.05)])
    assert lengths.stats() == (pytest.approx(90 + 50 + 250), 1000)


@pytest.mark.parametrize(("edit", "message"), [
    (("peak_qps = 10", "peak_qps = 0"), "traffic.peak_qps: Input should be greater than 0"),
    (("zones = 2", "zones = 65"), "fleet.zones: Input should be less than or equal to 64"),
    (("headroom = 0.25", "headroom = -1"),
     "fleet.headroom: Input should be greater than or equal to 0"),
    (("{ mean = 2000, p95 = 6000 }", "{ mean = 2000, p95 = 1000 }"),
     "traffic.prompt_tokens: p95 (1000) must be >= mean (2000)"),
    (("{ mean = 200, p95 = 800 }", "{ mean = 200 }"),
     "traffic.output_tokens: mean and p95 are both required"),
    (("{ mean = 200, p95 = 800 }", "{ histogram = [[10, 0]] }"),
     "traffic.output_tokens: histogram weights must be > 0"),
    (("memory_gib = 40", "memory_gib = 40\nspeed = 1"), "gpu.speed: Extra inputs"),
    (("[model]\nmemory_gib_per_copy = 30", ""), "model: Field required"),
])
def test_an_invalid_profile_names_the_field_and_the_limit(tmp_path, edit, message):
    path = write(tmp_path)
    path.write_text(path.read_text().replace(*edit))
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert message in str(raised.value)
    result = invoke(path)
    assert result.exit_code == 1 and message in result.output


def test_an_unreadable_profile_is_refused(tmp_path):
    (tmp_path / "bad.toml").write_text("peak_qps = ")
    for path in (tmp_path / "bad.toml", tmp_path / "missing.toml"):
        result = invoke(path)
        assert result.exit_code == 1 and str(path) in result.output
