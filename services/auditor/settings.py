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

from services.auditor.store import LogOptions
from services.common.settings import ServiceSettings

SIGNING_KEY_FILE = "signing.key"


class AuditorSettings(ServiceSettings):
    """One per auditor process; `AuditorSettings()` reads the environment."""

    # populate_by_name: code and tests may still write AuditorSettings(data_dir=...).
    model_config = SettingsConfigDict(populate_by_name=True)

    data_dir: pathlib.Path = Field(
        pathlib.Path(".infermesh/data/auditor"),
        validation_alias=AliasChoices("INFERMESH_AUDITOR_DATA_DIR", "INFERMESH_DATA_DIR"),
        description="Directory holding the segments and checkpoints; created if missing.",
    )
    signing_key: pathlib.Path | None = Field(
        None,
        validation_alias="INFERMESH_AUDITOR_SIGNING_KEY",
        description="PEM ed25519 key that signs checkpoints (a mounted secret in production); "
        "default <data_dir>/signing.key, created on first start.",
    )
    batch_max_events: int = Field(
        4096, ge=1, le=65_536, validation_alias="INFERMESH_AUDITOR_BATCH_MAX_EVENTS",
        description="Most events in one AppendRequest.",
    )
    group_max_events: int = Field(
        8192, ge=1, validation_alias="INFERMESH_AUDITOR_GROUP_MAX_EVENTS",
        description="Most events written per fsync when batches of many streams are merged.",
    )
    max_event_bytes: int = Field(
        65_536, ge=256, validation_alias="INFERMESH_AUDITOR_MAX_EVENT_BYTES",
        description="Largest serialized event accepted.",
    )
    max_inflight_batches: int = Field(
        16, ge=1, validation_alias="INFERMESH_AUDITOR_MAX_INFLIGHT_BATCHES",
        description="Batches one Append stream may have waiting for their fsync.",
    )
    dedupe_window: int = Field(
        65_536, ge=0, validation_alias="INFERMESH_AUDITOR_DEDUPE_WINDOW",
        description="How many recent event ids are remembered to drop retried events; 0 = off.",
    )
    write_timeout_s: float = Field(
        10.0, gt=0, validation_alias="INFERMESH_AUDITOR_WRITE_TIMEOUT_S",
        description="Deadline for one batch to become durable (queueing included).",
    )
    append_timeout_s: float = Field(
        300.0, gt=0, validation_alias="INFERMESH_AUDITOR_APPEND_TIMEOUT_S",
        description="Longest one Append stream may stay open, whatever the client's deadline.",
    )
    segment_max_bytes: int = Field(
        64 << 20, ge=4096, validation_alias="INFERMESH_AUDITOR_SEGMENT_MAX_BYTES",
        description="A segment is closed and a new one started past this size.",
    )
    segment_max_age_s: float = Field(
        3600.0, gt=0, validation_alias="INFERMESH_AUDITOR_SEGMENT_MAX_AGE_S",
        description="… or once its first record is this old.",
    )
    checkpoint_interval_s: float = Field(
        1.0, gt=0, validation_alias="INFERMESH_AUDITOR_CHECKPOINT_INTERVAL_S",
        description="How often a checkpoint is signed (when the log grew) and published.",
    )
    retention_s: float = Field(
        0.0, ge=0, validation_alias="INFERMESH_AUDITOR_RETENTION_S",
        description="Whole segments whose records are all older than this are dropped; 0 = "
        "keep everything.",
    )
    retention_check_interval_s: float = Field(
        60.0, gt=0, validation_alias="INFERMESH_AUDITOR_RETENTION_CHECK_INTERVAL_S",
        description="How often retention looks for segments to drop.",
    )
    query_max_records: int = Field(
        100_000, ge=1, validation_alias="INFERMESH_AUDITOR_QUERY_MAX_RECORDS",
        description="The largest `limit` a Query may ask for.",
    )
    read_workers: int = Field(
        4, ge=1, validation_alias="INFERMESH_AUDITOR_READ_WORKERS",
        description="Threads that scan the log for reads (Query, Verify, proofs): their own, "
        "so a burst of reads never delays group commit, which writes in the default pool.",
    )
    max_reads_per_tenant: int = Field(
        2, ge=1, validation_alias="INFERMESH_AUDITOR_MAX_READS_PER_TENANT",
        description="Reads one tenant's keys may run at once, counted until their scans end; "
        "more are refused (RESOURCE_EXHAUSTED). Keep it below read_workers, so one tenant never "
        "holds every read thread.",
    )
    query_timeout_s: float = Field(
        60.0, gt=0, validation_alias="INFERMESH_AUDITOR_QUERY_TIMEOUT_S",
        description="Longest a Query, Verify or proof may scan the log.",
    )

    @property
    def signing_key_path(self) -> pathlib.Path:
        return self.signing_key or self.data_dir / SIGNING_KEY_FILE

    def log_options(self) -> LogOptions:
        return LogOptions(segment_max_bytes=self.segment_max_bytes,
                          segment_max_age_s=self.segment_max_age_s,
                          dedupe_window=self.dedupe_window)
