"""The registry's settings: the common service fields plus the blob store and canary analysis.

Its own fields read `INFERMESH_REGISTRY_<FIELD>` variables, so one environment can configure the
whole embedded stack without a registry setting leaking into another service.
"""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.common.slo import DEFAULT_SLO_CONFIG
from services.registry.canary import CanaryPolicy
from services.registry.s3_blobs import S3Location


class RegistrySettings(ServiceSettings):
    """One per registry process; `RegistrySettings()` reads the environment."""

    # populate_by_name: tests may write RegistrySettings(blob_dir=...).
    model_config = SettingsConfigDict(populate_by_name=True)

    blob_store: Literal["local", "s3"] = Field(
        "local", validation_alias="INFERMESH_REGISTRY_BLOB_STORE",
        description="Where blobs live: `local` (blob_dir; one registry process) or `s3` (an "
        "S3-compatible bucket every registry pod shares; see docs/decisions.md).",
    )
    blob_dir: pathlib.Path = Field(
        pathlib.Path(".infermesh/data/blobs"),
        validation_alias="INFERMESH_REGISTRY_BLOB_DIR",
        description="Root of the local content-addressed blob store; created if missing. With "
        "the s3 store, where this process stages uploads in progress until they verify.",
    )
    s3_bucket: str = Field(
        "", validation_alias="INFERMESH_REGISTRY_S3_BUCKET",
        description="The s3 store's bucket (required with blob_store=s3; it must exist). "
        "Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_WEB_IDENTITY_TOKEN_FILE …).",
    )
    s3_prefix: str = Field(
        "", validation_alias="INFERMESH_REGISTRY_S3_PREFIX",
        description="Key prefix of the blobs in the bucket (e.g. `infermesh/prod/`).",
    )
    s3_endpoint_url: str = Field(
        "", validation_alias="INFERMESH_REGISTRY_S3_ENDPOINT_URL",
        description="The S3 API's URL for MinIO, Ceph RGW and the like; empty: AWS S3.",
    )
    s3_region: str = Field(
        "", validation_alias="INFERMESH_REGISTRY_S3_REGION",
        description="The bucket's region; empty: AWS_REGION / AWS_DEFAULT_REGION.",
    )
    s3_timeout_s: float = Field(
        10.0, gt=0, validation_alias="INFERMESH_REGISTRY_S3_TIMEOUT_S",
        description="Connect and read deadline of one S3 call (botocore retries it).",
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

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> RegistrySettings:
        if self.blob_store == "s3" and not self.s3_bucket:
            raise ValueError("INFERMESH_REGISTRY_S3_BUCKET is required with blob_store=s3")
        return self

    def s3_location(self) -> S3Location:
        return S3Location(bucket=self.s3_bucket, prefix=self.s3_prefix,
                          endpoint_url=self.s3_endpoint_url, region=self.s3_region,
                          timeout_s=self.s3_timeout_s)

    def canary_policy(self) -> CanaryPolicy:
        return CanaryPolicy(
            window_s=self.canary_window_s, min_requests=self.canary_min_requests,
            max_error_burn=self.canary_max_error_burn, error_margin=self.canary_error_margin,
            max_ttft_p95_ratio=self.canary_max_ttft_p95_ratio,
            min_ttft_p95_delta_s=self.canary_min_ttft_p95_delta_s,
            max_cost_ratio=self.canary_max_cost_ratio,
        )
