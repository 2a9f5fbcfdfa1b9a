"""The auditor as a real process, with real etcd: pipelined appends acknowledged after fsync,
access-controlled queries and proofs, checkpoints published to etcd, a SIGKILL under heavy
load that loses nothing acknowledged, and a record edited on disk caught after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import shutil
import time
import urllib.request
import uuid

import grpc
import pytest

from deploy.local.etcd_server import EtcdServer
from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.auditor import reader, store
from services.auditor.checkpoints import CHECKPOINT_KEY, PUBLIC_KEYS_PREFIX, Checkpoint, keyring
from services.auditor.client import append, consistency_from_message, inclusion_from_message
from services.auditor.verify import format_result, verify
from services.common import etcd, status
from services.common.discovery import ServiceDirectory
from services.common.net import LOOPBACK
from services.common.tenancy import Tenant, TenantStore
from tests.integration.auditors import Auditor, audit_event

pytestmark = pytest.mark.integration

RPC_TIMEOUT_S = 10.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def keys_for(client, *tenants: str) -> dict[str, str]:
    """An admin key (tenant `ops-…`) and one user key per tenant."""
    store_ = TenantStore(client)
    suffix = uuid.uuid4().hex[:6]
    issued = {}
    await store_.put_tenant(Tenant(f"ops-{suffix}", "operators"))
    issued["admin"], _ = await store_.issue_key(f"ops-{suffix}", role="admin")
    for tenant in tenants:
        await store_.put_tenant(Tenant(tenant, tenant))
        issued[tenant], _ = await store_.issue_key(tenant)
    return issued


async def published(client, key_id: str) -> Checkpoint | None:
    value = await client.get(f"{CHECKPOINT_KEY}/{key_id}".encode())
    return Checkpoint.from_record(json.loads(value.value)) if value else None


async def wait_published(client, key_id: str, size: int, timeout_s: float = 10.0) -> Checkpoint:
    deadline = time.monotonic() + timeout_s
    while True:
        checkpoint = await published(client, key_id)
        if checkpoint is not None and checkpoint.size >= size:
            return checkpoint
        assert time.monotonic() < deadline, f"no checkpoint of {size} records in etcd"
        await asyncio.sleep(0.1)


async def test_append_read_prove_and_verify(etcd_server: EtcdServer, tmp_path) -> None:
    data_dir = tmp_path / "data"
    acme, zeta = f"acme-{uuid.uuid4().hex[:6]}", f"zeta-{uuid.uuid4().hex[:6]}"
    client = etcd.connect(etcd_server.endpoint, 2.0)
    keys = await keys_for(client, acme, zeta)
    auditor = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-1.log")
    try:
        await auditor.start()
        async with grpc.aio.insecure_channel(auditor.endpoint) as channel:
            stub = auditor_pb2_grpc.AuditorStub(channel)

            # One stream, three batches in flight: three acks, in order, each after fsync.
            batches = [auditor_pb2.AppendRequest(events=[
                audit_event(n, tenant=acme if n % 2 else zeta) for n in range(s, s + 10)])
                for s in (1, 11, 21)]
            acks = [ack async for ack in stub.Append(iter(batches), timeout=RPC_TIMEOUT_S)]
            assert [(a.appended, a.last_sequence) for a in acks] == [(10, 10), (10, 20), (10, 30)]

            # Two writers at once, and a retried batch stored once.
            first, second, retry = await asyncio.gather(
                append(channel, [audit_event(n, tenant=acme) for n in range(31, 41)], 10),
                append(channel, [audit_event(n, tenant=zeta) for n in range(41, 51)], 10),
                append(channel, [audit_event(n) for n in range(1, 6)], 10))
            assert first.appended + second.appended == 20
            assert (retry.appended, retry.duplicates) == (0, 5)

            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await append(channel, [audit_event(100), audit_event(101, event_id="")], 10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert status.from_rpc_error(raised.value).field == "events[1].event_id"

            # Queries: admins see every tenant, a tenant key only its own.
            async def query(key: str, **fields: object) -> list[auditor_pb2.AuditRecord]:
                request = auditor_pb2.QueryRequest(**fields)  # type: ignore[arg-type]
                return [r async for r in stub.Query(request, metadata=bearer(key),
                                                     timeout=RPC_TIMEOUT_S)]

            everything = await query(keys["admin"], limit=1000)
            assert [r.sequence for r in everything] == list(range(1, 51))
            mine = await query(keys[acme])
            assert mine and {r.event.generation.tenant for r in mine} == {acme}
            assert [r.sequence for r in await query(keys["admin"], tenant=zeta)] == [
                r.sequence for r in everything if r.event.generation.tenant == zeta]
            assert (await query(keys[acme], request_id="req-7"))[0].line.startswith('{"seq":7,')
            for key, fields, code in (
                (keys[acme], {"tenant": zeta}, grpc.StatusCode.PERMISSION_DENIED),
                ("imk_not-a-key", {}, grpc.StatusCode.UNAUTHENTICATED),
                (keys["admin"], {"limit": 10**6}, grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await query(key, **fields)
                assert refused.value.code() == code, fields

            # Proofs, checked with nothing but the key published in etcd.
            trusted = keyring(kv.value for kv in
                              await client.get_prefix(PUBLIC_KEYS_PREFIX.encode()))
            proof = await stub.ProveInclusion(auditor_pb2.ProveInclusionRequest(
                request_id="req-7"), metadata=bearer(keys[acme]), timeout=RPC_TIMEOUT_S)
            assert proof.sequence == 7 and inclusion_from_message(proof).check(trusted) == ""
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await stub.ProveInclusion(auditor_pb2.ProveInclusionRequest(request_id="req-8"),
                                          metadata=bearer(keys[acme]), timeout=RPC_TIMEOUT_S)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND  # zeta's record
            old = proof.checkpoint.tree_size
            await append(channel, [audit_event(n, tenant=acme) for n in range(51, 61)], 10)
            consistency = await stub.ProveConsistency(
                auditor_pb2.ProveConsistencyRequest(old_size=old), metadata=bearer(keys[zeta]),
                timeout=RPC_TIMEOUT_S)
            assert consistency.new.tree_size == 60
            assert consistency_from_message(consistency).check(trusted) == ""

            verified = await stub.Verify(auditor_pb2.VerifyRequest(), metadata=bearer(
                keys["admin"]), timeout=RPC_TIMEOUT_S)
            assert (verified.ok, verified.records, verified.first_bad_sequence) == (True, 60, -1)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.Verify(auditor_pb2.VerifyRequest(), metadata=bearer(keys[acme]),
                                  timeout=RPC_TIMEOUT_S)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        key_id = next(iter(reader.local_keys(data_dir)))
        witnessed = await wait_published(client, key_id, 60)
        metrics = await asyncio.to_thread(scrape, auditor.metrics_port)
        assert "infermesh_auditor_events_appended_total 60.0" in metrics
        assert "infermesh_auditor_events_duplicate_total 5.0" in metrics
        assert "infermesh_auditor_checkpoint_published_size 60.0" in metrics
    finally:
        exit_code = await auditor.stop()
    assert exit_code == 0, auditor.process.log_tail()
    assert await client.get(auditor.key.encode()) is None, "registration outlived the process"

    # Offline, as `meshctl audit verify --etcd` does it: the key and checkpoint from etcd.
    result = verify(data_dir, keys=trusted, trusted=[witnessed])
    assert (result.ok, result.last_sequence) == (True, 60), format_result(result)

    backup = tmp_path / "backup"
    shutil.copytree(data_dir, backup)

    # Someone edits record 17 on disk: offline verification names it, and so does a
    # restarted auditor, which keeps appending after the intact head.
    segment = store.list_segments(data_dir)[0]
    lines = segment.log_path.read_bytes().splitlines(keepends=True)
    assert b'"prompt_tokens":17' in lines[16]
    lines[16] = lines[16].replace(b'"prompt_tokens":17', b'"prompt_tokens":1')
    segment.log_path.write_bytes(b"".join(lines))
    assert verify(data_dir).first_bad_sequence == 17

    restarted = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-2.log")
    try:
        await restarted.start()
        async with grpc.aio.insecure_channel(restarted.endpoint) as channel:
            assert (await append(channel, [audit_event(61)], 10)).last_sequence == 61
            stub = auditor_pb2_grpc.AuditorStub(channel)
            verified = await stub.Verify(auditor_pb2.VerifyRequest(), metadata=bearer(
                keys["admin"]), timeout=RPC_TIMEOUT_S)
            assert (verified.ok, verified.records, verified.first_bad_sequence) == (False, 16, 17)
            assert "does not match its hash" in verified.problem
    finally:
        exit_code = await restarted.stop()
    assert exit_code == 0, restarted.process.log_tail()

    # An old backup (60 records) restored under the same key: etcd has seen record 61 signed,
    # so the auditor refuses to start rather than silently forget it.
    stale = Auditor(etcd_server.endpoint, backup, tmp_path / "auditor-3.log")
    try:
        stale.process.start()
        exit_code = await asyncio.to_thread(stale.process.process.wait, 30)
    finally:
        await stale.stop()
        await client.close()
    assert exit_code != 0
    assert "acknowledged records are missing" in stale.process.log_tail()


async def test_sigkill_under_heavy_load_loses_nothing_acknowledged(
    etcd_server: EtcdServer, tmp_path: pathlib.Path
) -> None:
    """Sixteen writers keep batches in flight; the auditor is SIGKILLed mid-stream. After a
    restart every acknowledged event is in the log once, the log verifies against the
    checkpoint it published to etcd before the crash, and that checkpoint is a prefix of the
    new one (consistency proof)."""
    data_dir = tmp_path / "data"
    client = etcd.connect(etcd_server.endpoint, 2.0)
    keys = await keys_for(client)
    auditor = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-1.log")
    acknowledged: list[str] = []
    sent = 0

    async def writer(channel: grpc.aio.Channel, number: int) -> None:
        nonlocal sent

        async def batches():
            nonlocal sent
            for index in range(10_000):
                events = [audit_event(number * 1_000_000 + index * 50 + n) for n in range(50)]
                pending.append([e.event_id for e in events])
                sent += len(events)
                yield auditor_pb2.AppendRequest(events=events)

        pending: list[list[str]] = []
        call = auditor_pb2_grpc.AuditorStub(channel).Append(batches(), timeout=60)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ack in call:
                acknowledged.extend(pending.pop(0))

    try:
        await auditor.start()
        async with grpc.aio.insecure_channel(auditor.endpoint) as channel:
            writers = [asyncio.create_task(writer(channel, n)) for n in range(16)]
            deadline = time.monotonic() + 20
            while len(acknowledged) < 8_000 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            before_kill = await published(client, next(iter(reader.local_keys(data_dir))))
            await auditor.kill()
            async with asyncio.timeout(20):
                await asyncio.gather(*writers)
        assert len(acknowledged) >= 1000, auditor.process.log_tail()
        assert sent > len(acknowledged)  # the kill really was mid-stream
        assert before_kill is not None  # (it may cover records whose acks were still in flight)

        restarted = Auditor(etcd_server.endpoint, data_dir, tmp_path / "auditor-2.log")
        try:
            await restarted.start()
            async with grpc.aio.insecure_channel(restarted.endpoint) as channel:
                last = (await append(channel, [audit_event(99_000_000)], 10)).last_sequence
                stub = auditor_pb2_grpc.AuditorStub(channel)
                proof = await stub.ProveConsistency(
                    auditor_pb2.ProveConsistencyRequest(old_size=before_kill.size),
                    metadata=bearer(keys["admin"]), timeout=RPC_TIMEOUT_S)
        finally:
            assert await restarted.stop() == 0, restarted.process.log_tail()
    finally:
        await auditor.stop()
        await client.close()

    view = reader.view_of(data_dir)
    stored = [json.loads(line)["event"]["event_id"] for _seq, line in reader.lines(view)]
    assert len(stored) == len(set(stored)) == last
    missing = set(acknowledged) - set(stored)
    assert not missing, f"{len(missing)} acknowledged events lost"
    trusted = reader.local_keys(data_dir)
    result = verify(data_dir, keys=trusted, trusted=[before_kill])
    assert result.ok, format_result(result)
    assert consistency_from_message(proof).check(trusted) == ""


async def test_append_needs_the_mesh_token_when_the_mesh_has_one(
    etcd_server: EtcdServer, tmp_path
) -> None:
    auditor = Auditor(etcd_server.endpoint, tmp_path / "audit", tmp_path / "auditor.log",
                      INFERMESH_MESH_TOKEN="mesh-secret")
    await auditor.start()
    client = etcd.connect(etcd_server.endpoint, 2.0)
    try:
        async with grpc.aio.insecure_channel(auditor.endpoint) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await append(channel, [audit_event(1)], 5.0)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "x-infermesh-mesh-token" in anonymous.value.details()
        for token, code in (("wrong", grpc.StatusCode.UNAUTHENTICATED), ("mesh-secret", None)):
            directory = ServiceDirectory(client, None, token)
            try:
                channel = directory.channel_to(auditor.endpoint)
                if code is None:
                    assert (await append(channel, [audit_event(2)], 5.0)).appended == 1
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await append(channel, [audit_event(3)], 5.0)
                    assert refused.value.code() == code
            finally:
                await directory.close()
    finally:
        await client.close()
        assert await auditor.stop() == 0, auditor.process.log_tail()
    stored = [json.loads(line)["event"]["event_id"]
              for _seq, line in reader.lines(reader.view_of(tmp_path / "audit"))]
    assert stored == ["ev-000002"]  # nothing refused was stored


async def test_two_tenants_colliding_request_ids_each_prove_their_own(
    etcd_server: EtcdServer, tmp_path
) -> None:
    """Request ids are chosen by clients: an intruder reusing a victim's id must neither hide
    the victim's record from its proof nor see it (issue 15, class 9)."""
    acme, zeta = f"acme-{uuid.uuid4().hex[:6]}", f"zeta-{uuid.uuid4().hex[:6]}"
    client = etcd.connect(etcd_server.endpoint, 2.0)
    keys = await keys_for(client, acme, zeta)
    auditor = Auditor(etcd_server.endpoint, tmp_path / "audit", tmp_path / "auditor.log")
    try:
        await auditor.start()
        async with grpc.aio.insecure_channel(auditor.endpoint) as channel:
            await append(channel, [audit_event(1, tenant=acme, request_id="shared"),
                                   audit_event(2, tenant=zeta, request_id="shared")], 10)
            stub = auditor_pb2_grpc.AuditorStub(channel)

            async def prove(key: str, tenant: str = "") -> int:
                proof = await stub.ProveInclusion(auditor_pb2.ProveInclusionRequest(
                    request_id="shared", tenant=tenant), metadata=bearer(key),
                    timeout=RPC_TIMEOUT_S)
                return proof.sequence

            assert await prove(keys[acme]) == 1  # not zeta's newer record, not NOT_FOUND
            assert await prove(keys[zeta]) == 2
            assert await prove(keys["admin"], acme) == 1
            assert await prove(keys["admin"]) == 2  # an admin without a tenant: the newest
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await prove(keys[acme], zeta)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await client.close()
        assert await auditor.stop() == 0, auditor.process.log_tail()
