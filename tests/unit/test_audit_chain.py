"""The audit chain on disk: appends, recovery after a crash, and verification of tampering."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest

from services.auditor import chain
from services.common import errors


def event(n: int, **extra: object) -> dict[str, object]:
    return {"event_id": f"ev-{n}", "source": "test", "generation": {"tenant": "t1", **extra}}


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "auditor" / chain.LOG_FILE_NAME


def write(path: pathlib.Path, count: int, start: int = 1) -> None:
    with chain.AuditLog.open(path) as audit_log:
        audit_log.append_batch([event(n) for n in range(start, start + count)])


def lines(path: pathlib.Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_writes_a_chain_that_verifies(path: pathlib.Path) -> None:
    with chain.AuditLog.open(path) as audit_log:
        first = audit_log.append_batch([event(1), event(2)])
        second = audit_log.append_batch([event(3)])
        head = audit_log.head
    assert (first.appended, first.last_sequence) == (2, 2)
    assert (second.appended, second.last_sequence) == (1, 3)
    records = [chain.parse_line(line) for line in lines(path)]
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev == chain.GENESIS_HASH
    assert [r.prev for r in records[1:]] == [r.hash for r in records[:-1]]
    assert records[2].event == event(3)
    assert (head.sequence, head.hash, head.size) == (3, records[2].hash, path.stat().st_size)
    result = chain.verify(path)
    assert result == chain.VerifyResult(True, 3, -1, "", records[2].hash)
    assert chain.format_result(result).startswith("audit chain OK: 3 records")


def test_record_format_is_the_documented_canonical_form(path: pathlib.Path) -> None:
    write(path, 1)
    line = lines(path)[0]
    value = json.loads(line)
    assert list(value) == ["seq", "prev", "event", "hash"]
    canonical = json.dumps(
        {"event": value["event"], "prev": value["prev"], "seq": 1},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    assert value["hash"] == hashlib.sha256(canonical).hexdigest()
    assert line.endswith(b"}\n") and b" " not in line


def test_reopen_continues_the_chain(path: pathlib.Path) -> None:
    write(path, 3)
    with chain.AuditLog.open(path) as audit_log:
        assert audit_log.head.sequence == 3
        assert audit_log.append_batch([event(4)]).last_sequence == 4
    result = chain.verify(path)
    assert result.ok and result.records == 4


def test_an_empty_log_verifies(path: pathlib.Path) -> None:
    chain.AuditLog.open(path).close()
    assert chain.verify(path) == chain.VerifyResult(True, 0, -1, "", chain.GENESIS_HASH)


def test_verify_of_a_missing_file_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        chain.verify(tmp_path / "nothing.log")


def test_an_edited_field_is_reported_at_its_record(path: pathlib.Path) -> None:
    write(path, 5)
    content = lines(path)
    content[2] = content[2].replace(b'"tenant":"t1"', b'"tenant":"t2"')
    path.write_bytes(b"".join(content))
    result = chain.verify(path)
    assert not result.ok
    assert (result.first_bad_sequence, result.records) == (3, 2)
    assert "does not match its hash" in result.problem
    assert "BROKEN at record 3" in chain.format_result(result)


def test_a_whitespace_edit_is_reported(path: pathlib.Path) -> None:
    write(path, 3)
    content = lines(path)
    content[1] = content[1].replace(b'"seq":2,', b'"seq": 2,')
    path.write_bytes(b"".join(content))
    result = chain.verify(path)
    assert (result.ok, result.first_bad_sequence) == (False, 2)
    assert "canonical" in result.problem


def test_a_deleted_middle_record_is_reported(path: pathlib.Path) -> None:
    write(path, 5)
    content = lines(path)
    del content[2]
    path.write_bytes(b"".join(content))
    result = chain.verify(path)
    assert (result.ok, result.first_bad_sequence, result.records) == (False, 3, 2)
    assert "found record 4" in result.problem


def test_swapped_records_are_reported(path: pathlib.Path) -> None:
    write(path, 5)
    content = lines(path)
    content[1], content[3] = content[3], content[1]
    path.write_bytes(b"".join(content))
    result = chain.verify(path)
    assert (result.ok, result.first_bad_sequence) == (False, 2)


def test_a_rewritten_record_with_a_recomputed_hash_breaks_the_next_link(
    path: pathlib.Path,
) -> None:
    write(path, 4)
    content = lines(path)
    original = chain.parse_line(content[1])
    forged = chain.Record.create(2, original.prev, event(2, tenant="mallory"))
    content[1] = forged.to_line()
    path.write_bytes(b"".join(content))
    result = chain.verify(path)
    assert (result.ok, result.first_bad_sequence) == (False, 3)
    assert "does not chain to record 2" in result.problem


def test_a_malformed_line_is_reported(path: pathlib.Path) -> None:
    write(path, 3)
    content = lines(path)
    content[0] = b'{"seq":1,"prev":NaN}\n'
    path.write_bytes(b"".join(content))
    result = chain.verify(path)
    assert (result.ok, result.first_bad_sequence, result.records) == (False, 1, 0)
    assert "malformed" in result.problem


def test_torn_tail_is_cut_on_reopen_and_kept_aside(path: pathlib.Path) -> None:
    write(path, 3)
    intact = path.read_bytes()
    torn = chain.Record.create(4, "0" * 64, event(4)).to_line()[:25]
    path.write_bytes(intact + torn)
    result = chain.verify(path)
    assert result.ok and result.records == 3 and result.torn_tail_bytes == len(torn)
    assert "unfinished final write" in chain.format_result(result)
    with chain.AuditLog.open(path) as audit_log:
        assert audit_log.head.sequence == 3
        assert path.read_bytes() == intact
        assert audit_log.append_batch([event(4)]).last_sequence == 4
    (aside,) = path.parent.glob(f"{chain.LOG_FILE_NAME}.torn-*")
    assert aside.read_bytes() == torn
    assert chain.verify(path).records == 4


def test_an_unparsable_last_line_is_cut_on_reopen(path: pathlib.Path) -> None:
    write(path, 2)
    intact = path.read_bytes()
    path.write_bytes(intact + b"\x00\x00garbage\n")
    with chain.AuditLog.open(path) as audit_log:
        assert audit_log.head.sequence == 2
        audit_log.append_batch([event(3)])
    assert chain.verify(path).records == 3


def test_a_tampered_last_record_refuses_to_open(path: pathlib.Path) -> None:
    write(path, 2)
    content = lines(path)
    content[-1] = content[-1].replace(b'"tenant":"t1"', b'"tenant":"tX"')
    path.write_bytes(b"".join(content))
    with pytest.raises(chain.LogCorrupted):
        chain.AuditLog.open(path)


def test_a_second_writer_is_refused(path: pathlib.Path) -> None:
    with chain.AuditLog.open(path):
        with pytest.raises(chain.LogBusy):
            chain.AuditLog.open(path)


def test_recent_event_ids_are_stored_once_even_across_reopen(path: pathlib.Path) -> None:
    with chain.AuditLog.open(path, dedupe_window=10) as audit_log:
        result = audit_log.append_batch([event(1), event(2), event(1)])
        assert (result.appended, result.duplicates, result.last_sequence) == (2, 1, 2)
    with chain.AuditLog.open(path, dedupe_window=10) as audit_log:
        result = audit_log.append_batch([event(2), event(3)])
        assert (result.appended, result.duplicates, result.last_sequence) == (1, 1, 3)
        assert audit_log.append_batch([event(3)]) == chain.AppendResult(0, 1, 3)
    assert chain.verify(path).records == 3


def test_the_dedupe_window_forgets_the_oldest_ids(path: pathlib.Path) -> None:
    with chain.AuditLog.open(path, dedupe_window=2) as audit_log:
        audit_log.append_batch([event(1), event(2), event(3)])
        assert audit_log.append_batch([event(1)]).appended == 1
        assert audit_log.append_batch([event(3)]).appended == 0


def test_tail_reading_spans_read_chunks(path: pathlib.Path) -> None:
    """Records longer than one backwards read still recover (ids and head)."""
    big = "x" * (70 * 1024)
    with chain.AuditLog.open(path, dedupe_window=5) as audit_log:
        audit_log.append_batch([event(n, note=big) for n in range(1, 4)])
    with chain.AuditLog.open(path, dedupe_window=5) as audit_log:
        assert audit_log.head.sequence == 3
        assert audit_log.append_batch([event(1), event(3)]).appended == 0
    assert chain.verify(path).records == 3


def test_an_event_without_an_id_is_refused_before_anything_is_written(
    path: pathlib.Path,
) -> None:
    with chain.AuditLog.open(path) as audit_log:
        with pytest.raises(errors.InvalidArgument) as raised:
            audit_log.append_batch([event(1), {"source": "test"}])
        assert raised.value.field == "event_id"
        assert audit_log.head.sequence == 0
    assert path.read_bytes() == b""


def test_a_failed_fsync_cuts_the_batch_and_the_next_append_recovers(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with chain.AuditLog.open(path) as audit_log:
        audit_log.append_batch([event(1)])
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(chain.os, "fsync", failing_fsync)
        with pytest.raises(errors.Unavailable):
            audit_log.append_batch([event(2)])
        monkeypatch.setattr(chain.os, "fsync", real_fsync)
        assert audit_log.append_batch([event(3)]).last_sequence == 2
    records = [chain.parse_line(line) for line in lines(path)]
    assert [r.event["event_id"] for r in records] == ["ev-1", "ev-3"]
    assert chain.verify(path).ok


def test_verify_accepts_the_data_directory(path: pathlib.Path) -> None:
    """`meshctl audit verify --data-dir` passes the directory, not the file."""
    write(path, 2)
    assert chain.verify(path.parent) == chain.verify(path)
