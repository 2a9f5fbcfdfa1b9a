"""Ratelimit settings (env prefix `INFERMESH_`, as every service)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import ServiceSettings


class RateLimitSettings(ServiceSettings):
    lease_ttl_s: float = Field(
        10.0, description="A gateway's quota lease lapses (its slots return) if not renewed."
    )
