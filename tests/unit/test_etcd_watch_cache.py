"""`WatchCache` reloads (after a broken watch) re-parse only what changed, over an in-memory
client that serves listings and breaks every watch."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from services.common import etcd
from services.scheduler.server import load_parser


class RelistingClient:
    """Each `get_prefix` returns the current keys; every watch breaks at once (a reconnect)."""

    def __init__(self, values: dict[str, tuple[bytes, int]]):
        self.values = values  # key → (value, mod revision)
        self.listings = 0

    async def get_prefix(self, prefix: bytes):
        self.listings += 1
        kvs = [SimpleNamespace(key=k.encode(), value=v, mod_revision=r)
               for k, (v, r) in self.values.items()]
        return _Listing(kvs)

    async def watch_prefix(self, prefix: bytes, start_revision: int):
        raise ConnectionError("watch broken")


class _Listing(list):
    header = SimpleNamespace(revision=100)


async def test_a_relisted_load_report_keeps_the_time_it_first_arrived():
    """A re-list hands back the same key at the same revision: not a new report, so its
    arrival stamp (what freshness is judged by) stays."""
    now = [100.0]
    key = etcd.Keys.load("a")
    client = RelistingClient({key: (b'{"schema": 1, "at": 5.0, "models": {}}', 7)})
    cache = etcd.WatchCache(client, etcd.Keys.replica_load, load_parser(lambda: now[0]),
                            retry_s=0.01)
    await cache.start()
    try:
        assert cache.items["a"].received_at == 100.0
        now[0] = 130.0
        async with asyncio.timeout(5):
            while client.listings < 3:
                await asyncio.sleep(0.01)
        assert cache.items["a"].received_at == 100.0  # still 30 s old: stale, as it should be
        client.values[key] = (b'{"schema": 1, "at": 35.0, "models": {}}', 9)
        listed = client.listings
        async with asyncio.timeout(5):
            while client.listings < listed + 2:
                await asyncio.sleep(0.01)
        assert cache.items["a"].received_at == 130.0  # a new write is a new report
    finally:
        await cache.stop()
