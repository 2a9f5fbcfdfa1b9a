"""The gateway's audit spool: framed files, a durable cursor, torn tails, and what a full spool
does under each policy. (Shipping to a real auditor is tests/integration/test_audit_spool.py.)"""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from prometheus_client import REGISTRY

from infermesh.v1 import auditor_pb2
from services.common import errors
from services.gateway.audit import (
    AuditEmitter,
    AuditSpoolSettings,
    Spool,
    encode_frames,
)


def payload(n: int) -> bytes:
    return auditor_pb2.AuditEvent(event_id=f"ev-{n}", request_id=f"req-{n}").SerializeToString()


def event_ids(payloads: list[bytes]) -> list[str]:
    return [auditor_pb2.AuditEvent.FromString(p).event_id for p in payloads]


def test_events_come_back_in_order_across_files_and_restarts(tmp_path: pathlib.Path) -> None:
    spool = Spool.open(tmp_path, file_bytes=2048)
    for start in range(0, 300, 30):
        spool.write([payload(n) for n in range(start, start + 30)])
    assert len(list(tmp_path.glob("*.spool"))) > 2
    batch = spool.read(100)
    assert event_ids(batch.payloads) == [f"ev-{n}" for n in range(100)]
    spool.commit(batch)
    assert spool.read(1).payloads == [payload(100)]  # the cursor moved; nothing re-read
    spool.close()

    reopened = Spool.open(tmp_path, file_bytes=2048)
    rest = reopened.read(1000)
    assert event_ids(rest.payloads) == [f"ev-{n}" for n in range(100, 300)]
    assert reopened.unacked_bytes == rest.size
    reopened.commit(rest)
    assert reopened.unacked_bytes == 0 and reopened.read(10).payloads == []
    assert len(list(tmp_path.glob("*.spool"))) == 1  # finished files are deleted
    reopened.close()


def test_a_torn_tail_is_cut_at_open(tmp_path: pathlib.Path) -> None:
    spool = Spool.open(tmp_path, file_bytes=1 << 20)
    spool.write([payload(1), payload(2)])
    spool.close()
    newest = sorted(tmp_path.glob("*.spool"))[-1]
    with open(newest, "ab") as file:
        file.write(encode_frames([payload(3) * 4])[:30])  # half a frame
    reopened = Spool.open(tmp_path, file_bytes=1 << 20)
    assert event_ids(reopened.read(10).payloads) == ["ev-1", "ev-2"]
    reopened.write([payload(3)])
    assert event_ids(reopened.read(10).payloads) == ["ev-1", "ev-2", "ev-3"]
    reopened.close()


def test_one_gateway_per_spool_directory(tmp_path: pathlib.Path) -> None:
    spool = Spool.open(tmp_path, file_bytes=4096)
    with pytest.raises(errors.FailedPrecondition, match="another gateway"):
        Spool.open(tmp_path, file_bytes=4096)
    spool.close()


class NoAuditor:
    """A service directory in which no auditor is registered (it is down)."""

    def channel(self, kind: str):
        raise errors.Unavailable(f"no {kind} service is registered")


def settings(tmp_path: pathlib.Path, on_full: str) -> AuditSpoolSettings:
    return AuditSpoolSettings(dir=tmp_path / "spool", max_bytes=64 << 10, on_full=on_full,
                              flush_interval_s=0.001, flush_timeout_s=0.2, retry_max_s=0.05)


def generation(n: int) -> auditor_pb2.AuditEvent:
    return auditor_pb2.AuditEvent(
        event_id=f"ev-{n:06d}", request_id=f"req-{n}",
        generation=auditor_pb2.GenerationRecord(tenant="acme", model="m", finish_reason="stop"),
    )


def dropped() -> float:
    return REGISTRY.get_sample_value("infermesh_gateway_audit_dropped_total",
                                     {"reason": "spool_full"}) or 0.0


async def test_with_the_auditor_down_events_wait_on_disk_for_the_next_start(tmp_path) -> None:
    emitter = await AuditEmitter.open(NoAuditor(), settings(tmp_path, "drop"), "gw", 1.0)
    for n in range(100):
        emitter.emit(generation(n))
    await emitter.close()
    spool = Spool.open(tmp_path / "spool", file_bytes=4096)
    assert event_ids(spool.read(1000).payloads) == [f"ev-{n:06d}" for n in range(100)]
    spool.close()


async def test_a_full_spool_drops_and_counts_under_drop(tmp_path) -> None:
    emitter = await AuditEmitter.open(NoAuditor(), settings(tmp_path, "drop"), "gw", 1.0)
    before = dropped()
    sent = 0
    while not emitter.full and sent < 10_000:
        emitter.emit(generation(sent))
        sent += 1
    emitter.emit(generation(sent))
    emitter.emit(generation(sent + 1))
    assert dropped() - before == 2
    await emitter.close()
    spool = Spool.open(tmp_path / "spool", file_bytes=4096)
    assert len(spool.read(20_000).payloads) == sent  # everything not counted as dropped
    spool.close()


class Admission:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def acquire_slot(self, *args, **kwargs):
        self.calls.append(("acquire", args, kwargs))
        return "slot"

    async def release_slot(self, *args, **kwargs):
        self.calls.append(("release", args, kwargs))


async def test_a_full_spool_refuses_new_generations_under_refuse(tmp_path) -> None:
    emitter = await AuditEmitter.open(NoAuditor(), settings(tmp_path, "refuse"), "gw", 1.0)
    admission = Admission()
    guarded = emitter.guard(admission)
    assert await guarded.acquire_slot("acme", "r1", hold_s=1.0) == "slot"
    before = dropped()
    sent = 0
    while not emitter.full and sent < 10_000:
        emitter.emit(generation(sent))
        sent += 1
    with pytest.raises(errors.Unavailable, match="audit spool is full") as refused:
        await guarded.acquire_slot("acme", "r2", hold_s=1.0)
    assert refused.value.retry_after_s
    await guarded.release_slot("acme", "slot")
    emitter.emit(generation(sent))  # a generation already running still gets its record
    assert dropped() == before
    assert [call[0] for call in admission.calls] == ["acquire", "release"]
    await emitter.close()
    spool = Spool.open(tmp_path / "spool", file_bytes=4096)
    assert len(spool.read(20_000).payloads) == sent + 1
    spool.close()


async def test_drop_policy_leaves_admission_alone(tmp_path) -> None:
    emitter = await AuditEmitter.open(NoAuditor(), settings(tmp_path, "drop"), "gw", 1.0)
    admission = Admission()
    assert emitter.guard(admission) is admission
    async with asyncio.timeout(10):
        await emitter.close()
