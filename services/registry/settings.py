"""The registry's settings: the common service fields plus the blob store and canary analysis.

Its own fields read `INFERMESH_REGISTRY_<FIELD>` variables, so one environment can configure the
whole embedded stack without a registry setting leaking into another service.
"""

from __future__ import annotations

import pathlib

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.common.slo import DEFAULT_SLO_CONFIG
from services.registry.canary import CanaryPolicy


class RegistrySettings(ServiceSettings):
    """One per registry process; `RegistrySettings()` reads the environment."""

    # populate_by_name: tests may write RegistrySettings(blob_dir=...).
    model_config = SettingsConfigDict(populate_by_name=True)

    blob_dir: pathlib.Path = Field(
        pathlib.Path(".infermesh/data/blobs"),
        validation_alias="INFERMESH_REGISTRY_BLOB_DIR",
        description="Root of the local content-addressed blob store; created if missing.",
    )
    max_blob_bytes: int = Field(
        1 << 40, validation_alias="INFERMESH_REGISTRY_MAX_BLOB_BYTES",
        description="Largest blob an upload may announce.",
    )
    auto_rollback: bool = Field(
        True, validation_alias="INFERMESH_REGISTRY_AUTO_ROLLBACK",
        description="Judge running canaries against production and clear those that breach.",
    )
    slo_config: pathlib.Path = Field(
        DEFAULT_SLO_CONFIG, validation_alias="INFERMESH_REGISTRY_SLO_CONFIG",
        description="The SLO tiers (slo.toml): availability objectives, client error codes.",
    )
    canary_check_interval_s: float = Field(
        2.0, gt=0, validation_alias="INFERMESH_REGISTRY_CANARY_CHECK_INTERVAL_S",
        description="How often the gateways are scraped and every canary judged.",
    )
    canary_window_s: float = Field(
        300.0, gt=0, validation_alias="INFERMESH_REGISTRY_CANARY_WINDOW_S",
        description="The sliding window a canary is judged over.",
    )
    canary_min_requests: int = Field(
        20, ge=1, validation_alias="INFERMESH_REGISTRY_CANARY_MIN_REQUESTS",
        description="Canary generations in the window before it is judged at all.",
    )
    canary_max_error_burn: float = Field(
        14.4, gt=0, validation_alias="INFERMESH_REGISTRY_CANARY_MAX_ERROR_BURN",
        description="Error-budget burn rate above which the canary breaches (with the margin).",
    )
    canary_error_margin: float = Field(
        0.05, ge=0, le=1, validation_alias="INFERMESH_REGISTRY_CANARY_ERROR_MARGIN",
        description="How far the canary's error ratio must exceed production's.",
    )
    canary_max_ttft_p95_ratio: float = Field(
        1.5, gt=1, validation_alias="INFERMESH_REGISTRY_CANARY_MAX_TTFT_P95_RATIO",
        description="Canary TTFT p95 over production's above which it breaches.",
    )
    canary_min_ttft_p95_delta_s: float = Field(
        0.05, ge=0, validation_alias="INFERMESH_REGISTRY_CANARY_MIN_TTFT_P95_DELTA_S",
        description="...and by at least this much slower (seconds).",
    )
    canary_max_cost_ratio: float = Field(
        1.25, gt=1, validation_alias="INFERMESH_REGISTRY_CANARY_MAX_COST_RATIO",
        description="Canary cost per 1k tokens over production's above which it breaches.",
    )
    canary_scrape_timeout_s: float = Field(
        2.0, gt=0, validation_alias="INFERMESH_REGISTRY_CANARY_SCRAPE_TIMEOUT_S",
        description="Deadline of one gateway /metrics scrape.",
    )

    def canary_policy(self) -> CanaryPolicy:
        return CanaryPolicy(
            window_s=self.canary_window_s, min_requests=self.canary_min_requests,
            max_error_burn=self.canary_max_error_burn, error_margin=self.canary_error_margin,
            max_ttft_p95_ratio=self.canary_max_ttft_p95_ratio,
            min_ttft_p95_delta_s=self.canary_min_ttft_p95_delta_s,
            max_cost_ratio=self.canary_max_cost_ratio,
        )
