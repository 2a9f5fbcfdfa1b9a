"""An intruder with an ordinary key sends fields of any size (issue 15, class 1): a
multi-megabyte idempotency key, a burst of Start frames naming a 200 KB model. Each is refused
with INVALID_ARGUMENT naming the field, nothing of it reaches the audit trail, and another
tenant's generation afterwards is still audited."""

from __future__ import annotations

import uuid

import grpc
import pytest

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.test_tenants_and_quotas import audited_generation, auth, new_tenant

pytestmark = pytest.mark.integration


async def test_oversized_fields_are_refused_and_other_tenants_stay_audited(stack: StackInfo):
    _, intruder = await new_tenant(stack)
    victim_tenant, victim = await new_tenant(stack)
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(inference_pb2.GenerateRequest(
                model=stack.model, prompt="hi", idempotency_key="k" * (3 << 20),
                params=inference_pb2.SamplingParams(max_tokens=2)),
                metadata=auth(intruder), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "idempotency_key" in raised.value.details()
        assert "at most 128" in raised.value.details()

        starts = [inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
            request_id=f"hostile-{n}", model="m" * 200_000, prompt="hi"))
            for n in range(64)]
        finals = [frame.final async for frame in stub.GenerateStream(
            iter(starts), metadata=auth(intruder), timeout=60) if frame.HasField("final")]
        assert len(finals) == 64
        assert {(f.error.code, f.error.field) for f in finals} == {("INVALID_ARGUMENT", "model")}

        request_id = f"after-hostile-{uuid.uuid4().hex[:8]}"
        await stub.Generate(inference_pb2.GenerateRequest(
            request_id=request_id, model=stack.model, prompt="Say something short.",
            params=inference_pb2.SamplingParams(max_tokens=2)),
            metadata=auth(victim), timeout=60)
    record = await audited_generation(stack, request_id)
    assert record.tenant == victim_tenant and record.finish_reason in ("stop", "length")
