"""Which environment variables configure the auditor, and where its log file lives."""

from __future__ import annotations

import pathlib

import pytest

from services.auditor.settings import AuditorSettings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INFERMESH_AUDITOR_DATA_DIR", "INFERMESH_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = AuditorSettings()
    assert settings.log_path == pathlib.Path(".infermesh/data/auditor/audit.log")
    assert settings.batch_max_events >= 1 and settings.dedupe_window > 0


def test_auditor_variables_win_over_the_plain_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_DATA_DIR", "/plain")
    assert AuditorSettings().data_dir == pathlib.Path("/plain")
    monkeypatch.setenv("INFERMESH_AUDITOR_DATA_DIR", "/auditor")
    monkeypatch.setenv("INFERMESH_AUDITOR_BATCH_MAX_EVENTS", "8")
    monkeypatch.setenv("INFERMESH_PORT", "5555")
    settings = AuditorSettings()
    assert (settings.data_dir, settings.batch_max_events, settings.port) == (
        pathlib.Path("/auditor"), 8, 5555,
    )


def test_fields_can_be_passed_by_name() -> None:
    settings = AuditorSettings(data_dir=pathlib.Path("/x"), dedupe_window=0)
    assert (settings.log_path, settings.dedupe_window) == (pathlib.Path("/x/audit.log"), 0)
