"""The gateway's audit spool against a real auditor (and real etcd for discovery): events
emitted while the auditor is down wait on disk, survive a gateway restart, and arrive once each,
in the order they were emitted, when the auditor comes back."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time

import pytest

from deploy.local.etcd_server import EtcdServer
from services.auditor import reader
from services.common import etcd
from services.common.discovery import ServiceDirectory
from services.gateway.audit import AuditEmitter, AuditSpoolSettings
from tests.integration.auditors import Auditor, audit_event

pytestmark = pytest.mark.integration


def stored_ids(data_dir: pathlib.Path) -> list[str]:
    try:
        view = reader.view_of(data_dir)
    except FileNotFoundError:
        return []
    return [json.loads(line)["event"]["event_id"] for _seq, line in reader.lines(view)]


async def wait_stored(data_dir: pathlib.Path, count: int, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while len(ids := stored_ids(data_dir)) < count:
        assert time.monotonic() < deadline, f"{len(ids)} of {count} events reached the auditor"
        await asyncio.sleep(0.1)
    return ids


async def test_events_wait_for_the_auditor_and_arrive_in_order(
    etcd_server: EtcdServer, tmp_path: pathlib.Path
) -> None:
    data_dir = tmp_path / "auditor"
    settings = AuditSpoolSettings(dir=tmp_path / "spool", flush_interval_s=0.005,
                                  retry_max_s=0.2, batch_events=64, flush_timeout_s=1.0)
    client = etcd.connect(etcd_server.endpoint, 2.0)
    directory = ServiceDirectory(client, None)
    await directory.start()
    emitted = [audit_event(n) for n in range(1, 501)]
    try:
        emitter = await AuditEmitter.open(directory, settings, "gateway-test", 2.0)
        for event in emitted[:300]:  # the auditor is not there yet
            emitter.emit(event)
        await asyncio.sleep(0.3)
        auditor = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-1.log")
        try:
            await auditor.start()
            assert await wait_stored(data_dir, 300) == [e.event_id for e in emitted[:300]]
        finally:
            assert await auditor.stop() == 0, auditor.process.log_tail()

        for event in emitted[300:]:  # down again; then the gateway restarts too
            emitter.emit(event)
        await emitter.close()
        emitter = await AuditEmitter.open(directory, settings, "gateway-test", 2.0)
        assert emitter.usage_bytes > 0
        auditor = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-2.log")
        try:
            await auditor.start()
            assert await wait_stored(data_dir, 500) == [e.event_id for e in emitted]
        finally:
            await emitter.close()
            assert await auditor.stop() == 0, auditor.process.log_tail()
        assert emitter.usage_bytes == 0
    finally:
        await directory.close()
        await client.close()


async def test_a_dead_gateways_spool_is_adopted_and_a_live_ones_left_alone(
    etcd_server: EtcdServer, tmp_path: pathlib.Path
) -> None:
    """Instance ids are new on every start: the next gateway ships what a dead one spooled."""
    data_dir = tmp_path / "auditor"
    settings = AuditSpoolSettings(root=tmp_path / "gateways", flush_interval_s=0.005,
                                  retry_max_s=0.2, flush_timeout_s=0.5)
    client = etcd.connect(etcd_server.endpoint, 2.0)
    directory = ServiceDirectory(client, None)
    await directory.start()
    dead_events = [audit_event(n) for n in range(1, 51)]
    try:
        dead = await AuditEmitter.open(directory, settings, "gw-dead", 2.0)  # no auditor yet
        for event in dead_events:
            dead.emit(event)
        await dead.close()  # as good as a crash: the events stay in its spool
        live = await AuditEmitter.open(directory, settings, "gw-live", 2.0)  # holds its LOCK
        auditor = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor.log")
        try:
            await auditor.start()
            adopter = await AuditEmitter.open(directory, settings, "gw-new", 2.0)
            try:
                assert await wait_stored(data_dir, 50) == [e.event_id for e in dead_events]
                deadline = time.monotonic() + 10.0
                while (tmp_path / "gateways" / "gw-dead").exists():
                    assert time.monotonic() < deadline, "the adopted spool was not removed"
                    await asyncio.sleep(0.05)
                assert settings.directory("gw-live").exists()
            finally:
                await adopter.close()
                await live.close()
        finally:
            assert await auditor.stop() == 0, auditor.process.log_tail()
    finally:
        await directory.close()
        await client.close()
