"""The gateway's audit shipper against an in-process auditor: events bounded before they are
spooled, batches cut by bytes, and what cannot be shipped set aside in `dead-letter.spool`
(counted) while the events behind it ship."""

from __future__ import annotations

import asyncio
import pathlib
import struct
import zlib

import grpc
import pytest
from prometheus_client import REGISTRY

from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.auditor.events import bound_event
from services.common.net import LOOPBACK, free_port
from services.gateway.audit import (
    DEAD_LETTER_FILE,
    AuditEmitter,
    AuditSpoolSettings,
    Spool,
    encode_frames,
)


class FakeAuditor(auditor_pb2_grpc.AuditorServicer):
    """Stores every batch it accepts; refuses (INVALID_ARGUMENT) a batch holding a "poison"."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.batch_bytes: list[int] = []

    async def Append(self, request_iterator, context):
        async for request in request_iterator:
            if any(e.request_id.startswith("poison") for e in request.events):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "events[0]: poisoned")
            self.batches.append([e.event_id for e in request.events])
            self.batch_bytes.append(request.ByteSize())
            yield auditor_pb2.AppendAck(appended=len(request.events))

    @property
    def stored(self) -> list[str]:
        return [event_id for batch in self.batches for event_id in batch]


class Directory:
    def __init__(self, endpoint: str):
        self._channel = grpc.aio.insecure_channel(endpoint)

    def channel(self, kind: str) -> grpc.aio.Channel:
        return self._channel


@pytest.fixture
async def auditor():
    server = grpc.aio.server()
    fake = FakeAuditor()
    auditor_pb2_grpc.add_AuditorServicer_to_server(fake, server)
    port = free_port()
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    yield fake, Directory(f"{LOOPBACK}:{port}")
    await server.stop(0)


def event(n: int, request_id: str | None = None, model: str = "m") -> auditor_pb2.AuditEvent:
    return auditor_pb2.AuditEvent(
        event_id=f"ev-{n:04d}", request_id=request_id or f"req-{n}", source="gateway/test",
        generation=auditor_pb2.GenerationRecord(tenant="acme", model=model, finish_reason="stop"))


def dead_lettered(reason: str) -> float:
    return REGISTRY.get_sample_value("infermesh_gateway_audit_dead_lettered_total",
                                     {"reason": reason}) or 0.0


async def ship(spool_dir: pathlib.Path, directory: Directory, count: int, fake: FakeAuditor,
               **overrides: object) -> None:
    """Opens an emitter on `spool_dir` and waits until `count` events were stored."""
    settings = AuditSpoolSettings(dir=spool_dir, flush_interval_s=0.001, flush_timeout_s=0.5,
                                  retry_max_s=0.05, **overrides)
    emitter = await AuditEmitter.open(directory, settings, "test", 5.0)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            while len(fake.stored) < count or emitter.usage_bytes:
                await asyncio.sleep(0.01)
    finally:
        await emitter.close()


def test_an_event_s_fields_are_bounded_and_the_cut_is_named() -> None:
    huge = event(1, request_id="r" * 5000, model="m" * 200_000)
    huge.admin.CopyFrom(auditor_pb2.AdminRecord(before_json="{" * 100_000, actor="a"))
    bounded = bound_event(huge)
    assert sorted(bounded.truncated) == ["admin.before_json", "request_id"]  # admin: the body
    assert len(bounded.request_id) == 256 and "...sha256:" in bounded.request_id
    assert len(bounded.admin.before_json) == 16_384 and bounded.admin.actor == "a"
    generation = bound_event(event(2, model="m" * 200_000))
    assert list(generation.truncated) == ["generation.model"]
    assert len(generation.generation.model) == 256 and generation.ByteSize() < 1024
    assert not bound_event(event(3)).truncated


async def test_batches_are_cut_by_bytes(tmp_path: pathlib.Path, auditor) -> None:
    fake, directory = auditor
    spool = Spool.open(tmp_path, file_bytes=4 << 20)
    padded = []
    for n in range(40):  # each near 30 KB: a field padded past what the emitter would keep
        e = event(n)
        e.generation.prompt_sha256 = "p" * 30_000
        padded.append(e.SerializeToString())
    spool.write(padded)
    spool.close()
    await ship(tmp_path, directory, 40, fake, batch_bytes=128 << 10)
    assert fake.stored == [f"ev-{n:04d}" for n in range(40)]
    assert len(fake.batches) >= 10 and max(fake.batch_bytes) <= (128 << 10) + 1024


async def test_an_event_the_auditor_refuses_is_dead_lettered_and_the_next_ship(
    tmp_path: pathlib.Path, auditor,
) -> None:
    fake, directory = auditor
    before = dead_lettered("refused")
    spool = Spool.open(tmp_path, file_bytes=4 << 20)
    spool.write([event(n, request_id="poison" if n == 3 else None).SerializeToString()
                 for n in range(8)])
    spool.close()
    await ship(tmp_path, directory, 7, fake)
    assert fake.stored == [f"ev-{n:04d}" for n in range(8) if n != 3]
    assert dead_lettered("refused") == before + 1
    assert b"ev-0003" in (tmp_path / DEAD_LETTER_FILE).read_bytes()


async def test_an_oversized_frame_in_the_middle_of_a_file_costs_only_itself(
    tmp_path: pathlib.Path, auditor,
) -> None:
    fake, directory = auditor
    before = dead_lettered("oversized")
    spool = Spool.open(tmp_path, file_bytes=64 << 20)
    huge = event(5, model="m" * (2 << 20)).SerializeToString()  # as the old code spooled it
    spool.write([event(n).SerializeToString() for n in range(5)] + [huge]
                + [event(n).SerializeToString() for n in range(6, 12)])
    spool.close()
    await ship(tmp_path, directory, 11, fake, batch_bytes=1 << 20)
    assert fake.stored == [f"ev-{n:04d}" for n in range(12) if n != 5]
    assert dead_lettered("oversized") == before + 1


async def test_a_corrupt_frame_in_the_middle_of_a_file_costs_only_itself(
    tmp_path: pathlib.Path, auditor,
) -> None:
    fake, directory = auditor
    before = dead_lettered("corrupt")
    payloads = [event(n).SerializeToString() for n in range(10)]
    data = bytearray(encode_frames(payloads))
    at = len(encode_frames(payloads[:4]))
    data[at + 5] ^= 0xFF  # frame 4's length: its header no longer checks
    data[at + 30] ^= 0xFF
    (tmp_path / f"{1:016d}.spool").write_bytes(bytes(data))
    await ship(tmp_path, directory, 9, fake)
    assert fake.stored == [f"ev-{n:04d}" for n in range(10) if n != 4]
    assert dead_lettered("corrupt") == before + 1


async def test_a_spool_poisoned_by_the_old_format_drains(tmp_path: pathlib.Path, auditor) -> None:
    """Frames without the magic (`length, CRC`), one of them 300 KB over `batch_bytes`: the
    bad one is set aside, the rest ship, and new frames append after them."""
    fake, directory = auditor
    payloads = [event(n, model="m" * (300_000 if n == 2 else 1)).SerializeToString()
                for n in range(6)]
    legacy = b"".join(struct.pack(">II", len(p), zlib.crc32(p)) + p for p in payloads)
    (tmp_path / f"{1:016d}.spool").write_bytes(legacy)
    await ship(tmp_path, directory, 5, fake, batch_bytes=64 << 10)
    assert fake.stored == [f"ev-{n:04d}" for n in range(6) if n != 2]
    assert (tmp_path / DEAD_LETTER_FILE).stat().st_size > 300_000
