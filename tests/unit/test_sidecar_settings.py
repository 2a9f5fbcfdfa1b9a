"""The sidecar's settings refuse values it cannot work with, naming the setting."""

from __future__ import annotations

import pydantic
import pytest

from backends.triton.sidecar import SidecarSettings


def test_defaults_suit_routing_and_a_fast_failover() -> None:
    settings = SidecarSettings()
    assert settings.load_interval_s == 0.25 and settings.load_refresh_s == 1.0
    assert settings.replica_lease_ttl_s == 2 and settings.gpu_type == "cpu"


@pytest.mark.parametrize(("field", "value"), [
    ("gpu_memory_mib", 0), ("load_interval_s", 0), ("health_interval_s", 10),
    ("replica_lease_ttl_s", 1), ("triton_timeout_s", 0), ("model_control_timeout_s", -1),
    ("drain_timeout_s", -1), ("replica_id", ""), ("gpu_type", ""),
])
def test_out_of_range_values_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        SidecarSettings(**{field: value})


def test_the_load_refresh_cannot_be_shorter_than_the_scrape_interval() -> None:
    with pytest.raises(pydantic.ValidationError, match="load_refresh_s"):
        SidecarSettings(load_interval_s=2.0, load_refresh_s=1.0)
