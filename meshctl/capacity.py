"""`meshctl capacity plan --profile FILE`: the fleet a traffic profile needs, with the arithmetic
shown step by step as a capacity review would check it.

The sizing is `services.scheduler.autoscale.size_replicas`, the same function the scheduler's
autoscaling signal runs on measured demand, so the plan and the live signal agree. The profile
is TOML (see deploy/capacity/example.toml):

    [traffic]  peak_qps; prompt_tokens and output_tokens, each {mean, p95} or
               {histogram = [[tokens, weight], ...]}
    [gpu]      name, memory_gib, prefill_tokens_per_s, decode_tokens_per_s, price_per_hour
    [model]    memory_gib_per_copy (weights + KV cache of one serving copy)
    [fleet]    zones, headroom, min_copies
    [slo]      ttft_p95_s
"""

from __future__ import annotations

import math
import pathlib
import tomllib
from dataclasses import dataclass

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.scheduler.autoscale import Sizing, TokenRates, size_replicas

capacity_app = typer.Typer(help="Plan the GPU fleet for a traffic profile.",
                           no_args_is_help=True)
HOURS_PER_MONTH = 730


@capacity_app.callback()
def _group() -> None:
    """Plan the GPU fleet for a traffic profile (a group, so that `plan` stays a subcommand)."""

MAX_TOKENS = 10_000_000
MAX_HISTOGRAM_BUCKETS = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lengths(_Strict):
    """A token-length distribution: mean and p95, or a small histogram of [tokens, weight]."""

    mean: float | None = Field(None, gt=0, le=MAX_TOKENS)
    p95: float | None = Field(None, gt=0, le=MAX_TOKENS)
    histogram: list[tuple[float, float]] | None = Field(
        None, min_length=1, max_length=MAX_HISTOGRAM_BUCKETS)

    @model_validator(mode="after")
    def _one_form(self) -> Lengths:
        if self.histogram is not None:
            if self.mean is not None or self.p95 is not None:
                raise ValueError("give either mean and p95 or a histogram, not both")
            for tokens, weight in self.histogram:
                if not 0 < tokens <= MAX_TOKENS:
                    raise ValueError(f"histogram tokens must be in (0, {MAX_TOKENS}]")
                if weight <= 0:
                    raise ValueError("histogram weights must be > 0")
            return self
        if self.mean is None or self.p95 is None:
            raise ValueError("mean and p95 are both required (or a histogram)")
        if self.p95 < self.mean:
            raise ValueError(f"p95 ({self.p95:g}) must be >= mean ({self.mean:g})")
        return self

    def stats(self) -> tuple[float, float]:
        """(mean, p95); a histogram's p95 is the smallest bucket that covers 95 % of weight."""
        if self.histogram is None:
            assert self.mean is not None and self.p95 is not None
            return self.mean, self.p95
        buckets = sorted(self.histogram)
        total = sum(weight for _, weight in buckets)
        mean = sum(tokens * weight for tokens, weight in buckets) / total
        covered = 0.0
        for tokens, weight in buckets:
            covered += weight
            if covered >= 0.95 * total - 1e-12:
                return mean, tokens
        return mean, buckets[-1][0]


class Traffic(_Strict):
    peak_qps: float = Field(gt=0, le=10_000_000)
    prompt_tokens: Lengths
    output_tokens: Lengths


class Gpu(_Strict):
    name: str = Field("gpu", min_length=1, max_length=64)
    memory_gib: float = Field(gt=0, le=16_384)
    prefill_tokens_per_s: float = Field(gt=0, le=1e9)
    decode_tokens_per_s: float = Field(gt=0, le=1e9)
    price_per_hour: float | None = Field(None, ge=0, le=100_000)


class Model(_Strict):
    memory_gib_per_copy: float = Field(gt=0, le=1_048_576)


class Fleet(_Strict):
    zones: int = Field(1, ge=1, le=64)
    headroom: float = Field(0.2, ge=0, le=10)
    min_copies: int = Field(1, ge=1, le=100_000)


class Slo(_Strict):
    ttft_p95_s: float | None = Field(None, gt=0, le=3600)


class Profile(_Strict):
    traffic: Traffic
    gpu: Gpu
    model: Model
    fleet: Fleet = Field(default_factory=Fleet)
    slo: Slo = Field(default_factory=Slo)


class ProfileError(ValueError):
    """The profile is unreadable or invalid; the message names each field and its limit."""


def load_profile(path: pathlib.Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            lines.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")
        raise ProfileError(f"{path}:\n  " + "\n  ".join(lines)) from exc


@dataclass(frozen=True)
class Plan:
    profile: Profile
    prompt: tuple[float, float]  # (mean, p95) tokens
    output: tuple[float, float]
    gpus_per_copy: int
    sizing: Sizing

    @property
    def gpus(self) -> int:
        return self.sizing.replicas * self.gpus_per_copy

    @property
    def ttft_p95_prefill_s(self) -> float:
        """Prefill time of a p95 prompt alone on one copy: the floor under TTFT."""
        return self.prompt[1] / self.sizing.capacity.prefill_tokens_per_s

    @property
    def ttft_met(self) -> bool:
        target = self.profile.slo.ttft_p95_s
        return target is None or self.ttft_p95_prefill_s <= target


def plan(profile: Profile) -> Plan:
    prompt, output = profile.traffic.prompt_tokens.stats(), profile.traffic.output_tokens.stats()
    qps = profile.traffic.peak_qps
    gpus_per_copy = math.ceil(profile.model.memory_gib_per_copy / profile.gpu.memory_gib)
    capacity = TokenRates(profile.gpu.prefill_tokens_per_s * gpus_per_copy,
                          profile.gpu.decode_tokens_per_s * gpus_per_copy)
    sizing = size_replicas(TokenRates(qps * prompt[0], qps * output[0]), capacity,
                           headroom=profile.fleet.headroom, zones=profile.fleet.zones,
                           min_copies=profile.fleet.min_copies)
    return Plan(profile, prompt, output, gpus_per_copy, sizing)


def _n(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def render(result: Plan, source: str) -> str:
    p, s = result.profile, result.sizing
    qps, gpu = p.traffic.peak_qps, p.gpu
    bound = max(s.prefill_replicas, s.decode_replicas)
    lines = [
        f"Capacity plan for {source}",
        "",
        "1. Demand at peak",
        f"   prompt tokens: mean {_n(result.prompt[0])}, p95 {_n(result.prompt[1])}",
        f"   output tokens: mean {_n(result.output[0])}, p95 {_n(result.output[1])}",
        f"   prefill: {_n(qps)} req/s × {_n(result.prompt[0])} tokens = "
        f"{_n(s.demand.prefill_tokens_per_s)} tokens/s",
        f"   decode:  {_n(qps)} req/s × {_n(result.output[0])} tokens = "
        f"{_n(s.demand.decode_tokens_per_s)} tokens/s",
        "",
        f"2. One replica (one serving copy on {gpu.name})",
        f"   GPUs per copy: ceil({_n(p.model.memory_gib_per_copy)} GiB ÷ "
        f"{_n(gpu.memory_gib)} GiB) = {result.gpus_per_copy}",
        f"   prefill: {_n(gpu.prefill_tokens_per_s)} tokens/s × {result.gpus_per_copy} = "
        f"{_n(s.capacity.prefill_tokens_per_s)} tokens/s",
        f"   decode:  {_n(gpu.decode_tokens_per_s)} tokens/s × {result.gpus_per_copy} = "
        f"{_n(s.capacity.decode_tokens_per_s)} tokens/s",
    ]
    if result.gpus_per_copy > 1:
        lines.append("   (assumes throughput scales linearly across a copy's GPUs: an upper "
                     "bound under tensor parallelism)")
    lines += [
        "",
        "3. Replicas",
        f"   for prefill: {_n(s.demand.prefill_tokens_per_s)} ÷ "
        f"{_n(s.capacity.prefill_tokens_per_s)} = {s.prefill_replicas:,.2f}",
        f"   for decode:  {_n(s.demand.decode_tokens_per_s)} ÷ "
        f"{_n(s.capacity.decode_tokens_per_s)} = {s.decode_replicas:,.2f}",
        f"   the larger: {bound:,.2f} ({s.bound}-bound)",
        f"   with {s.headroom:.0%} headroom: {bound:,.2f} × {1 + s.headroom:g} = "
        f"{bound * (1 + s.headroom):,.2f} → {s.with_headroom}",
    ]
    if s.zones > 1:
        lines.append(f"   surviving the loss of 1 of {s.zones} zones: {s.with_headroom} × "
                     f"{s.zones} ÷ {s.zones - 1} = "
                     f"{s.with_headroom * s.zones / (s.zones - 1):,.2f} → {s.zone_survival}")
    else:
        lines.append("   one zone: no zone-loss margin")
    if s.min_copies > s.zone_survival:
        lines.append(f"   raised to the minimum of {s.min_copies} copies")
    per_zone = f", about {math.ceil(s.replicas / s.zones)} per zone" if s.zones > 1 else ""
    lines.append(f"   final: {s.replicas} replicas = {result.gpus} GPUs{per_zone}")
    lines += ["", "4. Time to first token"]
    ttft = (f"   a p95 prompt's prefill alone on one replica: {_n(result.prompt[1])} ÷ "
            f"{_n(s.capacity.prefill_tokens_per_s)} = {result.ttft_p95_prefill_s:.3f} s")
    target = p.slo.ttft_p95_s
    if target is None:
        lines.append(ttft + " (no target given)")
    elif result.ttft_met:
        lines.append(ttft + f" ≤ target {target:g} s: met (queueing comes on top; the "
                     "headroom keeps it short)")
    else:
        lines.append(ttft + f" > target {target:g} s: NOT MET. More replicas cannot fix "
                     "this; a faster GPU, more GPUs per copy or shorter prompts can")
    if gpu.price_per_hour is not None:
        hourly = result.gpus * gpu.price_per_hour
        lines += ["", "5. Cost",
                  f"   {result.gpus} GPUs × ${gpu.price_per_hour:,.2f}/h = ${hourly:,.2f}/h, "
                  f"${hourly * HOURS_PER_MONTH:,.0f}/month ({HOURS_PER_MONTH} h)"]
    return "\n".join(lines)


@capacity_app.command("plan")
def plan_command(
    profile: pathlib.Path = typer.Option(..., "--profile", help="The traffic profile (TOML)."),
) -> None:
    """Print the fleet the profile needs, step by step; exit 1 if the profile is invalid or
    the TTFT target cannot be met at any fleet size."""
    try:
        loaded = load_profile(profile)
    except ProfileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    result = plan(loaded)
    typer.echo(render(result, str(profile)))
    if not result.ttft_met:
        raise typer.Exit(1)
