"""The registry's admin audit shipper against a real etcd outbox and a real auditor: an event
the auditor refuses is moved to the dead letters (one etcd transaction) while the events around
it are stored, and the outbox empties."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from deploy.local.etcd_server import EtcdServer
from services.auditor import reader
from services.common import etcd
from services.common.discovery import ServiceDirectory
from services.registry.admin_audit import DEAD_LETTER_PREFIX, AdminAuditShipper
from tests.integration.auditors import Auditor

pytestmark = pytest.mark.integration


def record(event_id: str, n: int) -> dict[str, Any]:
    return {"event_id": event_id, "time": 1_700_000_000.0 + n, "source": "registry/test",
            "actor": "key:admin", "action": "registry.set_alias", "target": f"m@{n}",
            "before_json": "{}", "after_json": "{}", "reason": ""}


async def test_a_refused_event_is_dead_lettered_and_the_others_are_stored(
    etcd_server: EtcdServer, tmp_path
) -> None:
    tag = uuid.uuid4().hex[:8]
    suffixes = [f"registry:m-{tag}:{n}" for n in range(6)]
    auditor = Auditor(etcd_server.endpoint, tmp_path / "audit", tmp_path / "auditor.log")
    await auditor.start()
    client = etcd.connect(etcd_server.endpoint, 5.0)
    directory = ServiceDirectory(client, None)
    shipper = AdminAuditShipper(client, directory, timeout_s=5.0, retry_s=0.1)
    try:
        for n, suffix in enumerate(suffixes):
            # The third has no event id: the auditor refuses it (INVALID_ARGUMENT).
            await client.put(etcd.Keys.registry_audit_event(suffix).encode(),
                             etcd.encode(record("" if n == 2 else suffix, n)))
        await directory.start()
        await shipper.start()
        async with asyncio.timeout(30):
            while any([await client.get(etcd.Keys.registry_audit_event(s).encode())
                       for s in suffixes]):
                await asyncio.sleep(0.1)
        dead = await client.get((DEAD_LETTER_PREFIX + suffixes[2]).encode())
        assert dead is not None and etcd.decode(dead.value)["reason"] == "refused"
    finally:
        await shipper.close()
        await directory.close()
        await client.close()
        assert await auditor.stop() == 0, auditor.process.log_tail()
    stored = [json.loads(line)["event"]["event_id"]
              for _seq, line in reader.lines(reader.view_of(tmp_path / "audit"))]
    assert [s for s in stored if tag in s] == [s for n, s in enumerate(suffixes) if n != 2]
