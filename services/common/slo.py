"""The one definition of the mesh's SLOs: what counts as a bad event, the error ratio, the burn
rate and the multi-window burn-rate policy.

Everything that judges service health against an objective uses this module, so they cannot
drift apart: `deploy/monitoring/generate.py` turns it into the Prometheus recording rules and
alerts, `meshctl slo` reads those rules back, and a rollout judge (the registry's canary
auto-rollback) asks Prometheus for `version_error_ratio_query(...)` — or counts events itself —
and compares `burn_rate(...)` with `PAGE_WINDOWS`. The objectives per model tier live in
`deploy/monitoring/slo.toml`.

    error ratio = bad events / eligible events      (over a window)
    burn rate   = error ratio / (1 - objective)     (1.0 spends the budget in exactly one period)
    breach      = burn(long window) > factor  and  burn(short window) > factor

Availability: eligible = every generation except the caller's own errors (`client_error_codes`,
e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED); bad = eligible and not OK. Latency (TTFT, ITL): eligible
= every observation of the gateway's histogram; bad = slower than the threshold.
"""

from __future__ import annotations

import pathlib
import re
import tomllib
from dataclasses import dataclass
from typing import Literal

from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SLO_CONFIG = REPO_ROOT / "deploy" / "monitoring" / "slo.toml"

# The gateway's metrics each SLI is computed from (services/gateway/pipeline.py).
GENERATIONS_METRIC = "infermesh_gateway_generations_total"
LATENCY_HISTOGRAMS = {
    "ttft": "infermesh_gateway_ttft_seconds",
    "itl": "infermesh_gateway_itl_seconds",
}
SloName = Literal["availability", "ttft", "itl"]
SLO_NAMES: tuple[SloName, ...] = ("availability", "ttft", "itl")
MODEL_NAME = re.compile(r"^[a-z0-9._-]{1,64}$")  # the registry's manifest.name rule


@dataclass(frozen=True)
class BurnWindow:
    """One pair of the SRE workbook's multi-window policy: alert when both windows burn faster
    than `factor`; the short window makes the alert stop soon after the burn stops."""

    severity: Literal["page", "ticket"]
    long: str
    short: str
    factor: float


PAGE_WINDOWS = (BurnWindow("page", "1h", "5m", 14.4), BurnWindow("page", "6h", "30m", 6.0))
TICKET_WINDOWS = (BurnWindow("ticket", "1d", "2h", 3.0), BurnWindow("ticket", "3d", "6h", 1.0))
BURN_WINDOWS = PAGE_WINDOWS + TICKET_WINDOWS
# Every window an error ratio is recorded for, shortest first.
RATIO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# Windows recorded per model *version*: what a canary judge needs (it lives minutes to hours).
VERSION_WINDOWS = ("5m", "30m", "1h", "6h")


def error_ratio(bad: float, eligible: float) -> float | None:
    """bad / eligible; None when nothing was eligible (no traffic is not a breach)."""
    if bad < 0 or eligible < 0:
        raise ValueError(f"event counts must be >= 0, got bad={bad}, eligible={eligible}")
    if eligible == 0:
        return None
    return min(bad / eligible, 1.0)


def burn_rate(ratio: float, objective: float) -> float:
    """How many times faster than sustainable the error budget is being spent."""
    if not 0.0 < objective < 1.0:
        raise ValueError(f"objective must be in (0, 1), got {objective}")
    return ratio / (1.0 - objective)


def breaching(window: BurnWindow, long_burn: float | None, short_burn: float | None) -> bool:
    """The alert condition of one window pair; no data in either window is no breach."""
    if long_burn is None or short_burn is None:
        return False
    return long_burn > window.factor and short_burn > window.factor


class LatencyObjective(BaseModel):
    """`objective` of the observations must be no slower than `threshold_s`. The threshold must
    be a bucket boundary of the gateway's histogram (the stack test checks the bucket exists)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold_s: float = Field(gt=0, le=60)
    objective: float = Field(ge=0.5, lt=1.0)

    @property
    def le(self) -> str:
        """The histogram `le` label of the threshold, formatted as prometheus_client writes it."""
        return floatToGoString(self.threshold_s)


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = Field("", max_length=200)
    availability: float = Field(ge=0.5, lt=1.0)
    ttft: LatencyObjective
    itl: LatencyObjective
    models: tuple[str, ...] = Field((), max_length=200)

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        for name in models:
            if not MODEL_NAME.match(name):
                raise ValueError(
                    f"model {name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-'")
        return models

    def objective(self, slo: SloName) -> float:
        return self.availability if slo == "availability" else getattr(self, slo).objective


class SloConfig(BaseModel):
    """The whole of `slo.toml`: tiers of objectives, and which models belong to which tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    period_days: int = Field(ge=1, le=90)
    default_tier: str
    client_error_codes: tuple[str, ...] = Field(min_length=1, max_length=16)
    tiers: dict[str, Tier] = Field(min_length=1, max_length=16)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, Tier]) -> dict[str, Tier]:
        for name in tiers:
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
                raise ValueError(
                    f"tier name {name!r} must be 1-32 characters of a-z, 0-9, '_', '-'")
        return tiers

    @field_validator("client_error_codes")
    @classmethod
    def _codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        for code in codes:
            if code == "OK" or not re.fullmatch(r"[A-Z_]{2,32}", code):
                raise ValueError(f"{code!r} is not a gRPC status code name other than OK")
        return codes

    @model_validator(mode="after")
    def _tiers_consistent(self) -> SloConfig:
        if self.default_tier not in self.tiers:
            raise ValueError(
                f"default_tier {self.default_tier!r} is not one of {sorted(self.tiers)}")
        seen: dict[str, str] = {}
        for tier_name, tier in self.tiers.items():
            for model in tier.models:
                if model in seen:
                    raise ValueError(
                        f"model {model!r} is in tiers {seen[model]!r} and {tier_name!r}")
                seen[model] = tier_name
        return self

    @property
    def period(self) -> str:
        return f"{self.period_days}d"

    def tier_of(self, model: str) -> str:
        for name, tier in self.tiers.items():
            if model in tier.models:
                return name
        return self.default_tier

    def model_selector(self, tier: str) -> str:
        """PromQL label matcher for the models of `tier`. The default tier takes every model that
        no other tier names, so a new model is covered from its first request."""
        if tier == self.default_tier:
            others = [m for name, t in self.tiers.items() if name != tier for m in t.models]
            return f'model!~"{_alternation(others)}"' if others else 'model=~".+"'
        if not self.tiers[tier].models:
            raise ValueError(f"tier {tier!r} names no models and is not the default tier")
        return f'model=~"{_alternation(self.tiers[tier].models)}"'

    def tiers_in_use(self) -> list[str]:
        """Tiers that can hold a model: the default one and every one that names a model."""
        return [n for n, t in self.tiers.items() if n == self.default_tier or t.models]


def _alternation(models: list[str] | tuple[str, ...]) -> str:
    # Model names are [a-z0-9._-]: only '.' is special in a regex (doubled for the PromQL string).
    return "|".join(m.replace(".", "\\\\.") for m in sorted(models))


def load_slo_config(path: pathlib.Path = DEFAULT_SLO_CONFIG) -> SloConfig:
    """Parses and validates `slo.toml`; a bad field raises pydantic's ValidationError naming it."""
    with path.open("rb") as handle:
        return SloConfig.model_validate(tomllib.load(handle))


# -- PromQL: the same definition, as queries over the gateway's raw metrics --------------------


def eligible_rate_query(slo: SloName, selector: str, window: str, by: str,
                        config: SloConfig) -> str:
    """Per-second rate of eligible events over `window`, summed `by` the given labels."""
    if slo == "availability":
        client = "|".join(config.client_error_codes)
        return (f'sum by ({by}) (rate({GENERATIONS_METRIC}{{{selector},code!~"{client}"}}'
                f"[{window}]))")
    return f"sum by ({by}) (rate({LATENCY_HISTOGRAMS[slo]}_count{{{selector}}}[{window}]))"


def bad_rate_query(slo: SloName, selector: str, window: str, by: str, config: SloConfig,
                   tier: Tier) -> str:
    """Per-second rate of bad events over `window`: eligible and not OK, or slower than the
    tier's threshold."""
    if slo == "availability":
        good_or_client = "|".join(("OK", *config.client_error_codes))
        return (f'sum by ({by}) (rate({GENERATIONS_METRIC}{{{selector},code!~"{good_or_client}"}}'
                f"[{window}]))")
    histogram, le = LATENCY_HISTOGRAMS[slo], getattr(tier, slo).le
    return (f"{eligible_rate_query(slo, selector, window, by, config)} - sum by ({by}) "
            f'(rate({histogram}_bucket{{{selector},le="{le}"}}[{window}]))')


def error_ratio_query(slo: SloName, selector: str, window: str, by: str, config: SloConfig,
                      tier: Tier) -> str:
    """bad / eligible over `window`; 0 (not absent) when there was traffic but nothing bad."""
    eligible = eligible_rate_query(slo, selector, window, by, config)
    bad = bad_rate_query(slo, selector, window, by, config, tier)
    return f"(({bad}) or {eligible} * 0) / {eligible}"


def version_error_ratio_query(config: SloConfig, slo: SloName, model: str, version: str,
                              window: str) -> str:
    """The error ratio of one model version, for a rollout judge: divide the result by
    `1 - objective` (`burn_rate`) and compare with `PAGE_WINDOWS`, as the alerts do."""
    if slo not in SLO_NAMES:
        raise ValueError(f"slo must be one of {SLO_NAMES}, got {slo!r}")
    if not MODEL_NAME.match(model):
        raise ValueError(f"model {model!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-'")
    if not re.fullmatch(r"[A-Za-z0-9:_.-]{1,80}", version):
        raise ValueError(f"version {version!r} must be 1-80 characters of A-Z a-z 0-9 : _ . -")
    if window not in VERSION_WINDOWS:
        raise ValueError(f"window must be one of {VERSION_WINDOWS}, got {window!r}")
    tier = config.tiers[config.tier_of(model)]
    selector = f'model="{model}",version="{version}"'
    return error_ratio_query(slo, selector, window, "model, version", config, tier)
