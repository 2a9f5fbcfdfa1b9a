"""The auditor's settings: the common service fields plus where and how it writes the log.

The auditor's own fields read `INFERMESH_AUDITOR_*` variables (not plain `INFERMESH_*`), so one
environment can configure the whole embedded stack without, say, a registry data directory
leaking into the auditor's. The data directory also accepts plain `INFERMESH_DATA_DIR`, which
the embedded stack sets for the auditor child alone; the auditor-specific name wins.
"""

from __future__ import annotations

import pathlib

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.auditor.chain import LOG_FILE_NAME
from services.common.settings import ServiceSettings


class AuditorSettings(ServiceSettings):
    """One per auditor process; `AuditorSettings()` reads the environment."""

    # populate_by_name: code and tests may still write AuditorSettings(data_dir=...).
    model_config = SettingsConfigDict(populate_by_name=True)

    data_dir: pathlib.Path = Field(
        pathlib.Path(".infermesh/data/auditor"),
        validation_alias=AliasChoices("INFERMESH_AUDITOR_DATA_DIR", "INFERMESH_DATA_DIR"),
        description="Directory holding the audit log file; created if missing.",
    )
    batch_max_events: int = Field(
        256,
        ge=1,
        validation_alias="INFERMESH_AUDITOR_BATCH_MAX_EVENTS",
        description="Most events written per fsync while an Append stream is still open.",
    )
    dedupe_window: int = Field(
        65_536,
        ge=0,
        validation_alias="INFERMESH_AUDITOR_DEDUPE_WINDOW",
        description="How many recent event ids are remembered to drop retried events; 0 = off.",
    )
    write_timeout_s: float = Field(
        10.0,
        gt=0,
        validation_alias="INFERMESH_AUDITOR_WRITE_TIMEOUT_S",
        description="Deadline for waiting on, then doing, one batch's write + fsync.",
    )
    append_timeout_s: float = Field(
        300.0,
        gt=0,
        validation_alias="INFERMESH_AUDITOR_APPEND_TIMEOUT_S",
        description="Longest one Append stream may stay open, whatever the client's deadline.",
    )

    @property
    def log_path(self) -> pathlib.Path:
        """The audit log file (what `meshctl audit verify` reads by default)."""
        return self.data_dir / LOG_FILE_NAME
