"""What losing schedulers costs (issue 23), on the embedded stack with its two schedulers:

- `fallback_routing_added_ttft_p50_ms`: the gateway's TTFT p50 (its own Final timings, arrival to
  first token) while it routes by itself — both schedulers stopped and not restarted — minus the
  p50 with the schedulers routing, same run, same requests, one at a time.
- `scheduler_kill_failed_fraction`: of the generations started in the `window_s` after one of the
  two schedulers is SIGKILLed under steady traffic (the supervisor restarts it), the share that
  failed (goal 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.stack import Stack, StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc


async def _ttfts(stub: inference_pb2_grpc.InferenceStub, model: str, api_key: str,
                 count: int) -> tuple[list[float], int]:
    metadata = (("authorization", f"Bearer {api_key}"),)
    ttfts, errors = [], 0
    for i in range(count):
        try:
            reply = await stub.Generate(
                inference_pb2.GenerateRequest(model=model, prompt=f"failover bench {i}",
                                              params=inference_pb2.SamplingParams(max_tokens=4)),
                metadata=metadata, timeout=10)
            ttfts.append(reply.timings.time_to_first_token.ToTimedelta().total_seconds())
        except grpc.aio.AioRpcError:
            errors += 1
    return ttfts, errors


def p50(seconds: list[float]) -> float:
    """The median in milliseconds (NaN when nothing was measured)."""
    return statistics.median(seconds) * 1000 if seconds else float("nan")


async def _serving(info: StackInfo, name: str, deadline: float) -> None:
    async with info.channel(name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not SERVING again")
            await asyncio.sleep(0.1)


async def _fallback_ttft(stack: Stack, requests: int) -> dict[str, Any]:
    info, supervisor = stack.info, stack.supervisor
    assert info is not None and supervisor is not None
    schedulers = ["scheduler", "scheduler-2"]
    async with info.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await _ttfts(stub, info.reference_model, info.api_key, 3)  # warm
        routed, errors_before = await _ttfts(stub, info.reference_model, info.api_key, requests)
        for name in schedulers:  # an outage of every instance: nothing restarts them meanwhile
            supervisor.forget(name)
            os.kill(stack.children[name].pid, signal.SIGKILL)
            stack.children[name].process.wait(5)
        try:
            await _ttfts(stub, info.reference_model, info.api_key, 3)  # into the fallback
            alone, errors_alone = await _ttfts(stub, info.reference_model, info.api_key, requests)
        finally:
            for name in schedulers:
                stack.children[name].start()
                supervisor.watch(stack.children[name])
            for name in schedulers:
                await _serving(info, name, time.monotonic() + 30)
        await _ttfts(stub, info.reference_model, info.api_key, 3)  # back to the schedulers
    return {
        "fallback_routing_ttft_p50_ms": round(p50(alone), 2),
        "scheduler_routing_ttft_p50_ms": round(p50(routed), 2),
        "fallback_routing_added_ttft_p50_ms": round(p50(alone) - p50(routed), 2),
        "fallback_routing_errors": errors_before + errors_alone,
    }


async def _kill_one(stack: Stack, window_s: float, concurrency: int) -> dict[str, Any]:
    info = stack.info
    assert info is not None
    metadata = (("authorization", f"Bearer {info.api_key}"),)
    outcomes: list[tuple[float, bool]] = []  # (started, ok)
    stop = asyncio.Event()

    async def client(stub: inference_pb2_grpc.InferenceStub, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                await stub.Generate(
                    inference_pb2.GenerateRequest(
                        model=info.reference_model, prompt=f"kill {n} {i}",
                        params=inference_pb2.SamplingParams(max_tokens=4)),
                    metadata=metadata, timeout=10)
                outcomes.append((started, True))
            except grpc.aio.AioRpcError:
                outcomes.append((started, False))
            await asyncio.sleep(0.02)

    async with info.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        clients = [asyncio.create_task(client(stub, n)) for n in range(concurrency)]
        try:
            await asyncio.sleep(1.0)
            killed_at = time.monotonic()
            os.kill(stack.children["scheduler"].pid, signal.SIGKILL)
            await asyncio.sleep(window_s)
        finally:
            stop.set()
            async with asyncio.timeout(15):
                await asyncio.gather(*clients)
        await _serving(info, "scheduler", time.monotonic() + 30)  # restarted
    window = [ok for started, ok in outcomes if killed_at <= started < killed_at + window_s]
    failed = sum(not ok for ok in window)
    return {
        "scheduler_kill_failed_fraction": round(failed / len(window), 4) if window else 1.0,
        "scheduler_kill_generations": len(window),
    }


def run(stack: Stack, requests: int = 40, window_s: float = 10.0,
        concurrency: int = 4) -> dict[str, Any]:
    """Both figures, on `stack` (left whole: every scheduler runs again when this returns)."""
    figures = asyncio.run(_fallback_ttft(stack, requests))
    figures.update(asyncio.run(_kill_one(stack, window_s, concurrency)))
    return figures
