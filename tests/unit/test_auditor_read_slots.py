"""Audit reads are bounded per tenant, and a read that gave up on its scan (a deadline) keeps
its place until the scan in the read thread has really ended."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import types

import pytest

from services.auditor.server import AuditorServicer
from services.common import errors
from services.common.auth import Principal
from services.common.tenancy import TenantPlan


def servicer() -> AuditorServicer:
    """Only what the read slots use: the executor, the counts, the setting."""
    reads = AuditorServicer.__new__(AuditorServicer)
    reads._reads = concurrent.futures.ThreadPoolExecutor(4)
    reads._reads_by_tenant = collections.Counter()
    reads._settings = types.SimpleNamespace(max_reads_per_tenant=2)
    return reads


def key(tenant: str, key_id: str) -> Principal:
    return Principal(tenant, key_id, "user", TenantPlan())


async def test_a_tenants_keys_share_its_reads_and_a_timed_out_scan_still_counts():
    reads = servicer()
    release = threading.Event()
    with reads._read_slot(key("acme", "k1")), pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await reads._in_reads(release.wait)  # a scan that outlives its caller
    with reads._read_slot(key("acme", "k2")):  # the second of acme's two places
        with pytest.raises(errors.ResourceExhausted), reads._read_slot(key("acme", "k3")):
            pass  # refused: the timed-out scan still runs
        with reads._read_slot(key("other", "k4")):  # another tenant is not affected
            pass
    release.set()
    async with asyncio.timeout(5):
        while reads._reads_by_tenant["acme"]:
            await asyncio.sleep(0.01)
    with reads._read_slot(key("acme", "k1")):  # the scan ended: its place is back
        assert await reads._in_reads(lambda: 42) == 42
    reads._reads.shutdown()
