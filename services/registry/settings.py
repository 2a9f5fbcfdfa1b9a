"""The registry's settings: the common service fields plus the blob store and canary analysis.

Its own fields read `INFERMESH_REGISTRY_*` variables, so one environment can configure the whole
embedded stack without a registry setting leaking into another service.
"""

from __future__ import annotations

import pathlib

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


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
