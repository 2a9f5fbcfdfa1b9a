"""SIGTERM drains: a gateway stops taking work but finishes the generations it has."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from deploy.local.stack import StackInfo, service_process, wait_serving
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from services.common.net import free_port

pytestmark = pytest.mark.integration


async def test_sigterm_finishes_open_generations(stack: StackInfo, tmp_path):
    port = free_port()
    gateway = service_process(
        "gateway-2", "services.gateway", tmp_path / "gateway.log", port,
        {"INFERMESH_ETCD_ENDPOINT": stack.etcd, **stack.service_security("gateway"),
         "INFERMESH_AUDIT_SPOOL_DIR": str(tmp_path / "audit-spool")})
    gateway.start()
    try:
        endpoint = f"127.0.0.1:{port}"
        await asyncio.to_thread(wait_serving, gateway, endpoint, time.monotonic() + 20,
                                stack.client_tls())
        outbox: asyncio.Queue = asyncio.Queue()
        await outbox.put(inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
            request_id="drain", model=stack.reference_model, prompt="keep going",
            params=inference_pb2.SamplingParams(max_tokens=24, seed=1))))

        async def frames():
            while (frame := await outbox.get()) is not None:
                yield frame

        async with stack.channel("gateway", endpoint) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            call = stub.GenerateStream(
                frames(), metadata=(("authorization", f"Bearer {stack.api_key}"),))
            kinds = []
            final = None
            async for frame in call:
                kind = frame.WhichOneof("frame")
                kinds.append(kind)
                if kind == "accepted":
                    os.kill(gateway.pid, signal.SIGTERM)
                elif kind == "final":
                    final = frame.final
                    await outbox.put(None)
            assert await call.code() == grpc.StatusCode.OK
        assert final is not None, kinds
        assert final.finish_reason == inference_pb2.LENGTH
        assert final.usage.completion_tokens == 24
        assert gateway.process.wait(20) == 0, gateway.log_tail()
    finally:
        gateway.stop()
