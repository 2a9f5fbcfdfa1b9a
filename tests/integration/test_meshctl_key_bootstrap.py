"""`meshctl key bootstrap`: the first admin key of a new cluster, straight from etcd."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from meshctl.__main__ import app
from services.common import etcd
from services.common.tenancy import hash_key, parse_key

pytestmark = pytest.mark.integration


def test_bootstrap_prints_an_admin_key_once_and_stores_only_its_hash(etcd_server):
    runner = CliRunner()
    first = runner.invoke(app, ["key", "bootstrap", "ops-boot", "--etcd", etcd_server.endpoint])
    assert first.exit_code == 0, first.output
    clear = first.stdout.strip().splitlines()[0]
    again = runner.invoke(app, ["key", "bootstrap", "ops-boot", "--etcd", etcd_server.endpoint])
    assert again.exit_code == 0, again.output  # the tenant exists: a second key, same tenant

    async def read():
        async with etcd.connect(etcd_server.endpoint, 5.0) as client:
            return (await client.get(etcd.Keys.apikey(hash_key(clear)).encode()),
                    await client.get(etcd.Keys.tenant("ops-boot").encode()))

    stored, tenant = asyncio.run(read())  # the CLI runs its own loop, so this test is sync
    assert stored is not None and tenant is not None
    key = parse_key("", stored.value)
    assert key.role == "admin" and key.tenant_id == "ops-boot"
    assert clear.encode() not in stored.value
