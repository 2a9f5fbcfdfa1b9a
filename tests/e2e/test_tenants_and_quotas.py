"""Tenants, keys and token quotas over the real stack: admin API, reserve/commit/refund,
revocation and expiry."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import StackInfo
from infermesh.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

pytestmark = pytest.mark.integration


def auth(key: str):
    return (("authorization", f"Bearer {key}"),)


async def admin(stack: StackInfo, method: str, request, key: str | None = None):
    async with stack.channel() as channel:
        stub = tenants_pb2_grpc.TenantAdminStub(channel)
        return await getattr(stub, method)(request, metadata=auth(key or stack.api_key), timeout=10)


async def new_tenant(stack: StackInfo, **plan) -> tuple[str, str]:
    tenant_id = f"q-{uuid.uuid4().hex[:8]}"
    await admin(stack, "CreateTenant", tenants_pb2.CreateTenantRequest(
        tenant_id=tenant_id, plan=tenants_pb2.PlanUpdate(**plan)))
    issued = await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(tenant_id=tenant_id))
    await wait_key_state(stack, issued.api_key, grpc.StatusCode.OK)
    return tenant_id, issued.api_key


async def wait_key_state(stack: StackInfo, key: str, code: grpc.StatusCode, within_s=5.0) -> float:
    """Seconds until a call with `key` gets `code` (the gateway sees keys through a watch)."""
    started = time.monotonic()
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            try:
                await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=auth(key))
                got = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                got = exc.code()
            if got == code:
                return time.monotonic() - started
            assert time.monotonic() - started < within_s, f"still {got}, want {code}"
            await asyncio.sleep(0.02)


async def generate(stack: StackInfo, key: str, max_tokens: int):
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await stub.Generate(inference_pb2.GenerateRequest(
            model=stack.reference_model, prompt="count the tokens",
            params=inference_pb2.SamplingParams(max_tokens=max_tokens)), metadata=auth(key))


async def wait_tokens_used(stack: StackInfo, tenant_id: str, at_least: int) -> int:
    """The tenant's reported usage once it reaches `at_least` (gateways report on renewal)."""
    deadline = time.monotonic() + 10
    while True:
        info = await admin(stack, "GetTenant", tenants_pb2.GetTenantRequest(tenant_id=tenant_id))
        if info.tokens_used >= at_least:
            return info.tokens_used
        assert time.monotonic() < deadline, f"usage {info.tokens_used}, want {at_least}"
        await asyncio.sleep(0.1)


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.ToTimedelta().total_seconds()
    raise AssertionError("no RetryInfo in the status details")


async def test_output_quota_exhaustion_and_refill(stack: StackInfo):
    # 600 output tokens a minute: a burst of 100, then 10 a second.
    _, key = await new_tenant(stack, output_tokens_per_minute=600)
    reply = await generate(stack, key, 90)
    assert reply.usage.completion_tokens == 90
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate(stack, key, 90)  # ~10 left: 90 must wait ~8 s
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.details().startswith("output_tpm:")
    assert 6 <= retry_delay_s(raised.value) <= 8.1
    reply = await generate(stack, key, 10)  # what is left still serves a smaller request
    assert reply.usage.completion_tokens == 10


async def test_cancelled_request_refunds_unused_tokens(stack: StackInfo):
    # A burst of 200 output tokens: without the refund, a second 150 would wait ~5 s.
    tenant_id, key = await new_tenant(stack, output_tokens_per_minute=1200)
    outbox: asyncio.Queue = asyncio.Queue()
    await outbox.put(inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id="refund", model=stack.reference_model, prompt="go",
        params=inference_pb2.SamplingParams(max_tokens=150))))

    async def frames():
        while (frame := await outbox.get()) is not None:
            yield frame

    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        final = None
        async for frame in stub.GenerateStream(frames(), metadata=auth(key)):
            if frame.WhichOneof("frame") == "tokens":
                await outbox.put(inference_pb2.ClientFrame(
                    cancel=inference_pb2.Cancel(request_id="refund")))
            elif frame.WhichOneof("frame") == "final":
                final = frame.final
                await outbox.put(None)
    assert final.finish_reason == inference_pb2.CANCELLED
    used = final.usage.completion_tokens
    assert used < 150
    # The unused reservation came back: 150 more output tokens fit straight away.
    for _ in range(50):  # the settle is sent in the background after Final
        try:
            reply = await generate(stack, key, 150)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.02)
    assert reply.usage.completion_tokens <= 150
    # Gateways report usage when they renew their lease (every few seconds).
    await wait_tokens_used(stack, tenant_id, used + reply.usage.completion_tokens)


async def test_monthly_budget_refuses_with_a_clear_message(stack: StackInfo):
    _, key = await new_tenant(stack, monthly_token_budget=30)
    await generate(stack, key, 20)  # 3 prompt + 20 output
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate(stack, key, 20)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "monthly budget of 30 tokens" in raised.value.details()


async def test_revocation_at_every_gateway_and_expiry(stack: StackInfo, stack_dir):
    tenant_id, key = await new_tenant(stack)
    keys = await admin(stack, "ListKeys", tenants_pb2.ListKeysRequest(tenant_id=tenant_id))
    assert len(keys.keys) == 1 and not hasattr(keys.keys[0], "api_key")
    other = ExtraGateway(stack, stack_dir, name="gateway-revoke")
    await asyncio.to_thread(other.start)
    try:
        at_other = dataclasses.replace(stack, gateway=other.endpoint)
        await wait_key_state(at_other, key, grpc.StatusCode.OK)
        await admin(stack, "RevokeKey", tenants_pb2.RevokeKeyRequest(key_id=keys.keys[0].key_id))
        waits = await asyncio.gather(
            wait_key_state(stack, key, grpc.StatusCode.UNAUTHENTICATED, within_s=1.0),
            wait_key_state(at_other, key, grpc.StatusCode.UNAUTHENTICATED, within_s=1.0))
        assert max(waits) < 1.0
    finally:
        await asyncio.to_thread(other.stop)
    issued = await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(
        tenant_id=tenant_id, expires_at=time.time() + 1.5))
    await wait_key_state(stack, issued.api_key, grpc.StatusCode.OK)
    await wait_key_state(stack, issued.api_key, grpc.StatusCode.UNAUTHENTICATED, within_s=3.0)


async def test_key_times_are_timestamps_and_the_deprecated_seconds_still_work(stack: StackInfo):
    """tenants.proto's Timestamps (issue 17): a key issued with expire_time alone carries both
    forms of each time; the deprecated seconds still set an expiry; a past expire_time is
    INVALID_ARGUMENT naming it."""
    tenant_id, _ = await new_tenant(stack)
    expires = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    key = (await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(
        tenant_id=tenant_id, expire_time=expires))).key
    assert key.expire_time == expires and key.expires_at == expires.seconds
    assert key.create_time.seconds == int(key.created_at) > 0
    older = (await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(
        tenant_id=tenant_id, expires_at=expires.seconds + 0.5))).key
    assert older.expire_time.seconds == expires.seconds and older.expire_time.nanos > 0
    never = (await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(tenant_id=tenant_id))).key
    assert not never.HasField("expire_time") and never.expires_at == 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(
            tenant_id=tenant_id, expire_time=timestamp_pb2.Timestamp(seconds=1)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("expire_time:"), raised.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # past what a Timestamp holds
        await admin(stack, "IssueKey", tenants_pb2.IssueKeyRequest(
            tenant_id=tenant_id, expires_at=1e300))
    assert raised.value.details().startswith("expires_at: must be at most 253402300799")


async def test_admin_api_needs_an_admin_key_and_valid_plans(stack: StackInfo):
    tenant_id, user_key = await new_tenant(stack)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin(stack, "ListTenants", tenants_pb2.ListTenantsRequest(), key=user_key)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for plan, field in (({"priority": "gold"}, "plan.priority"),
                        ({"requests_per_minute": 0}, "plan.requests_per_minute"),
                        ({"max_output_tokens": 10**6}, "plan.max_output_tokens")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await admin(stack, "UpdateTenant", tenants_pb2.UpdateTenantRequest(
                tenant_id=tenant_id, plan=tenants_pb2.PlanUpdate(**plan)))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(field + ":"), raised.value.details()
    info = await admin(stack, "GetTenant", tenants_pb2.GetTenantRequest(tenant_id=tenant_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin(stack, "UpdateTenant", tenants_pb2.UpdateTenantRequest(
            tenant_id=tenant_id, expected_revision=info.revision - 1,
            plan=tenants_pb2.PlanUpdate(requests_per_minute=5)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    updated = await admin(stack, "UpdateTenant", tenants_pb2.UpdateTenantRequest(
        tenant_id=tenant_id, expected_revision=info.revision,
        plan=tenants_pb2.PlanUpdate(requests_per_minute=5)))
    assert updated.plan.requests_per_minute == 5
    assert updated.plan.max_concurrency == info.plan.max_concurrency


async def test_idempotent_repeat_returns_the_first_outcome_and_is_charged_once(stack: StackInfo):
    tenant_id, key = await new_tenant(stack)
    request = inference_pb2.GenerateRequest(
        model=stack.reference_model, prompt="say something once", idempotency_key="order-42",
        params=inference_pb2.SamplingParams(max_tokens=12, temperature=1.0))
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        first = await stub.Generate(request, metadata=auth(key))
        again = await stub.Generate(request, metadata=auth(key))
        other = inference_pb2.GenerateRequest()
        other.CopyFrom(request)
        other.prompt = "a different request"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(other, metadata=auth(key))
    assert again.text == first.text and again.usage == first.usage
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("idempotency_key:")
    charged = first.usage.prompt_tokens + first.usage.completion_tokens
    assert await wait_tokens_used(stack, tenant_id, charged) == charged


async def test_a_saturated_gateway_serves_premium_before_batch(stack: StackInfo, stack_dir):
    """One running place: while it is busy, a batch request and then a premium one queue; the
    premium one goes first."""
    _, busy_key = await new_tenant(stack)
    _, batch_key = await new_tenant(stack, priority="batch")
    _, premium_key = await new_tenant(stack, priority="premium")
    narrow = ExtraGateway(stack, stack_dir, name="gateway-narrow",
                          settings={"INFERMESH_MAX_RUNNING": "1"})
    await asyncio.to_thread(narrow.start)
    started: list[str] = []
    try:
        async with stack.channel("gateway", narrow.endpoint) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def run(name: str, key: str, max_tokens: int, first_token=None):
                frame = inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
                    request_id=name, model=stack.reference_model, prompt="wait your turn",
                    params=inference_pb2.SamplingParams(max_tokens=max_tokens,
                                                        min_tokens=max_tokens)))
                async for reply in stub.GenerateStream(iter([frame]), metadata=auth(key)):
                    kind = reply.WhichOneof("frame")
                    if kind == "accepted":
                        started.append(name)
                    elif kind == "tokens" and first_token is not None:
                        first_token.set()
                    elif kind == "final":
                        assert not reply.final.HasField("error"), reply.final.error
                        return

            for key in (busy_key, batch_key, premium_key):  # every key known to the gateway
                await wait_key_state(dataclasses.replace(stack, gateway=narrow.endpoint), key,
                                     grpc.StatusCode.OK)
            busy_started = asyncio.Event()
            busy = asyncio.create_task(run("busy", busy_key, 300, busy_started))
            async with asyncio.timeout(10):
                await busy_started.wait()
            batch = asyncio.create_task(run("batch", batch_key, 5))
            await asyncio.sleep(0.2)  # the batch request is queued first
            premium = asyncio.create_task(run("premium", premium_key, 5))
            async with asyncio.timeout(60):
                await asyncio.gather(busy, batch, premium)
    finally:
        await asyncio.to_thread(narrow.stop)
    assert started == ["busy", "premium", "batch"]


async def test_tenant_and_key_changes_are_audited(stack: StackInfo):
    since = timestamp_pb2.Timestamp()
    since.GetCurrentTime()
    tenant_id, _ = await new_tenant(stack)
    keys = await admin(stack, "ListKeys", tenants_pb2.ListKeysRequest(tenant_id=tenant_id))
    await admin(stack, "RevokeKey", tenants_pb2.RevokeKeyRequest(key_id=keys.keys[0].key_id))
    wanted = {("tenants.create", tenant_id), ("keys.issue", keys.keys[0].key_id),
              ("keys.revoke", keys.keys[0].key_id)}
    deadline = time.monotonic() + 15
    async with stack.channel("auditor") as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        while True:  # events reach the auditor through the gateway's spool
            found = {}
            async for record in stub.Query(auditor_pb2.QueryRequest(since=since, limit=1000),
                                           metadata=auth(stack.api_key), timeout=10):
                if record.event.WhichOneof("body") == "admin":
                    found[(record.event.admin.action, record.event.admin.target)] = \
                        record.event.admin
            if wanted <= found.keys():
                break
            assert time.monotonic() < deadline, f"audited so far: {sorted(found)}"
            await asyncio.sleep(0.2)
    created = found[("tenants.create", tenant_id)]
    assert created.actor.startswith("key:") and tenant_id in created.after_json
    issued = found[("keys.issue", keys.keys[0].key_id)]
    assert "imk_" not in issued.after_json  # never the clear key
    assert found[("keys.revoke", keys.keys[0].key_id)].before_json


async def test_a_degrading_plan_caps_max_tokens_before_refusing(stack: StackInfo):
    # A burst of 100 output tokens at 10 a second; under pressure, 16 instead of refusing.
    _, key = await new_tenant(stack, output_tokens_per_minute=600, degraded_max_tokens=16)
    first = await generate(stack, key, 90)
    assert first.usage.completion_tokens == 90
    await asyncio.sleep(1.0)  # ~10 tokens refill: not 90, but enough for the degraded cap
    degraded = await generate(stack, key, 90)
    assert degraded.usage.completion_tokens == 16
    assert degraded.finish_reason == inference_pb2.LENGTH


async def audited_generation(stack: StackInfo, request_id: str) -> auditor_pb2.GenerationRecord:
    """The generation's audit record, once it has come through the gateway's spool."""
    deadline = time.monotonic() + 15
    async with stack.channel("auditor") as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        while True:
            async for record in stub.Query(auditor_pb2.QueryRequest(request_id=request_id),
                                           metadata=auth(stack.api_key), timeout=10):
                return record.event.generation
            assert time.monotonic() < deadline, f"{request_id} was never audited"
            await asyncio.sleep(0.2)


async def test_audit_records_hold_text_hashes_only_for_tenants_that_ask(stack: StackInfo):
    hashing_tenant, hashing_key = await new_tenant(stack, audit_text_hashes=True)
    _, plain_key = await new_tenant(stack)
    shown = await admin(stack, "GetTenant", tenants_pb2.GetTenantRequest(tenant_id=hashing_tenant))
    assert shown.plan.audit_text_hashes
    prompt = "hash what the model was asked"
    records = {}
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for name, key in (("hashing", hashing_key), ("plain", plain_key)):
            request_id = f"hashes-{name}-{uuid.uuid4().hex[:8]}"
            reply = await stub.Generate(inference_pb2.GenerateRequest(
                request_id=request_id, model=stack.reference_model, prompt=prompt,
                params=inference_pb2.SamplingParams(max_tokens=8, seed=1)), metadata=auth(key))
            records[name] = (reply.text, await audited_generation(stack, request_id))
    text, hashed = records["hashing"]
    assert hashed.prompt_sha256 == hashlib.sha256(prompt.encode()).hexdigest()
    assert hashed.completion_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert text and prompt not in str(hashed) and text not in str(hashed)
    _, plain = records["plain"]
    assert plain.prompt_sha256 == plain.completion_sha256 == ""
