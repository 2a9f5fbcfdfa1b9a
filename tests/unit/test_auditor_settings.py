"""Which environment variables configure the auditor, and where its files live."""

from __future__ import annotations

import pathlib

import pytest
from pydantic import ValidationError

from services.auditor.settings import AuditorSettings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INFERMESH_AUDITOR_DATA_DIR", "INFERMESH_DATA_DIR",
                 "INFERMESH_AUDITOR_SIGNING_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = AuditorSettings()
    assert settings.data_dir == pathlib.Path(".infermesh/data/auditor")
    assert settings.signing_key_path == pathlib.Path(".infermesh/data/auditor/signing.key")
    assert settings.retention_s == 0  # keep everything unless told otherwise
    assert settings.log_options().dedupe_window == settings.dedupe_window > 0


def test_auditor_variables_win_over_the_plain_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_DATA_DIR", "/plain")
    assert AuditorSettings().data_dir == pathlib.Path("/plain")
    monkeypatch.setenv("INFERMESH_AUDITOR_DATA_DIR", "/auditor")
    monkeypatch.setenv("INFERMESH_AUDITOR_SIGNING_KEY", "/secrets/audit.key")
    monkeypatch.setenv("INFERMESH_AUDITOR_SEGMENT_MAX_BYTES", "8192")
    monkeypatch.setenv("INFERMESH_PORT", "5555")
    settings = AuditorSettings()
    assert (settings.data_dir, settings.signing_key_path, settings.port) == (
        pathlib.Path("/auditor"), pathlib.Path("/secrets/audit.key"), 5555,
    )
    assert settings.log_options().segment_max_bytes == 8192


def test_limits_are_checked_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_AUDITOR_BATCH_MAX_EVENTS", "0")
    with pytest.raises(ValidationError, match="INFERMESH_AUDITOR_BATCH_MAX_EVENTS"):
        AuditorSettings()


def test_fields_can_be_passed_by_name() -> None:
    settings = AuditorSettings(data_dir=pathlib.Path("/x"), dedupe_window=0)
    assert (settings.signing_key_path, settings.dedupe_window) == (
        pathlib.Path("/x/signing.key"), 0)
