"""Scheduler settings (env prefix `INFERMESH_`, as every service)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import ServiceSettings
from services.scheduler.breakers import BreakerSettings
from services.scheduler.routing import Policy, RoutingConfig


class SchedulerSettings(ServiceSettings):
    routing_policy: Policy = Field(
        Policy.PRECISE, description="precise | kv_aware | least_loaded | round_robin "
        "(docs/decisions.md); precise is kv_aware for replicas whose engines publish no KV "
        "events."
    )
    weight_prefix: float = Field(3.0, ge=0, le=100, description="kv_aware: prefix affinity.")
    weight_kv_free: float = Field(2.0, ge=0, le=100, description="kv_aware: free KV blocks.")
    weight_queue: float = Field(2.0, ge=0, le=100, description="kv_aware: engine queue.")
    weight_cache_spread: float = Field(
        0.0, ge=0, le=100, description="kv_aware: fewest cached prefix blocks (new prefixes)."
    )
    weight_zone: float = Field(1.0, ge=0, le=100, description="kv_aware: the caller's zone.")
    load_stale_after_s: float = Field(
        1.5, gt=0, le=60, description="A replica whose load report is older is not routed to."
    )
    queue_scale: int = Field(
        8, ge=1, le=100_000, description="Engine batch assumed when a report gives no `max`."
    )
    prefix_index_blocks: int = Field(
        65_536, ge=1, le=10_000_000, description="Prompt blocks remembered per model (LRU)."
    )
    max_hold_s: float = Field(3600.0, gt=0, description="The longest reservation a Route may ask.")
    breaker_consecutive_failures: int = Field(
        5, ge=1, le=1000, description="Failures in a row that open a replica's breaker."
    )
    breaker_error_rate: float = Field(
        0.5, gt=0, lt=1, description="Failed share over the window that opens a breaker."
    )
    breaker_min_requests: int = Field(
        10, ge=1, le=100_000, description="Outcomes in the window before the rate counts."
    )
    breaker_window_s: float = Field(30.0, gt=0, le=3600, description="The error-rate window.")
    breaker_cooldown_s: float = Field(
        5.0, gt=0, le=3600, description="How long a breaker stays open before one probe."
    )
    breaker_probe_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="A probe not judged by then (its Release) is lost, and "
        "another is let through."
    )
    zone_failing_fraction: float = Field(
        0.5, ge=0, lt=1, description="A zone's breaker opens when more of its replicas fail."
    )

    def routing_config(self) -> RoutingConfig:
        return RoutingConfig(
            policy=self.routing_policy,
            weights={"prefix": self.weight_prefix, "kv_free": self.weight_kv_free,
                     "queue": self.weight_queue, "cache_spread": self.weight_cache_spread,
                     "zone": self.weight_zone},
            load_stale_after_s=self.load_stale_after_s,
            queue_scale=self.queue_scale,
            prefix_index_blocks=self.prefix_index_blocks,
            breakers=BreakerSettings(
                consecutive_failures=self.breaker_consecutive_failures,
                error_rate=self.breaker_error_rate,
                min_requests=self.breaker_min_requests,
                window_s=self.breaker_window_s,
                cooldown_s=self.breaker_cooldown_s,
                probe_timeout_s=self.breaker_probe_timeout_s,
                zone_failing_fraction=self.zone_failing_fraction,
            ),
        )
