"""Failure drills on one embedded stack of their own (issue 23): each process in turn is SIGKILLed
(etcd is frozen instead) under steady traffic. Every generation that started afterwards must
succeed or fail with a retryable status within its deadline, generations must succeed again
within 10 s, and the supervisor must have the process back (restarted, SERVING) within 30 s.
With both schedulers killed, the gateway serves through its own fallback routing.

The stack is this module's, not the session's: the drills kill its processes. Each drill ends
with its process back, so the next drill starts from a whole stack.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import Stack, StackOptions
from deploy.local.state import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from services.common.tenancy import TenantPlan

pytestmark = pytest.mark.integration

DEADLINE_S = 6.0  # each generation's
SUCCEED_AGAIN_S = 10.0
BACK_S = 30.0
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED}


@pytest.fixture(scope="module")
def drill_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir: pathlib.Path = tmp_path_factory.mktemp("drills")
    # Steady traffic for a minute and more: far over the default plan's 600 requests a minute.
    running = Stack(StackOptions(state_dir=state_dir,
                                 demo_plan=TenantPlan(requests_per_minute=100_000)))
    running.up()
    try:
        yield running
    finally:
        running.down()


@dataclass
class Shot:
    started: float
    ended: float
    code: grpc.StatusCode
    details: str = ""


@dataclass
class Traffic:
    """`concurrency` clients sending one short generation after another, each with a deadline;
    a client tries the next gateway when one is unreachable (the client's retry)."""

    info: StackInfo
    gateways: list[str]
    concurrency: int = 2
    shots: list[Shot] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        channels = [self.info.channel("gateway", g) for g in self.gateways]
        try:
            await asyncio.gather(*(self._client(channels, n) for n in range(self.concurrency)))
        finally:
            for channel in channels:
                await channel.close()

    async def _client(self, channels: list[grpc.aio.Channel], n: int) -> None:
        metadata = (("authorization", f"Bearer {self.info.api_key}"),)
        i = 0
        while not self.stopping.is_set():
            i += 1
            request = inference_pb2.GenerateRequest(
                model=self.info.reference_model, prompt=f"drill {n} {i}",
                params=inference_pb2.SamplingParams(max_tokens=4))
            started = time.monotonic()
            code, details = grpc.StatusCode.OK, ""
            for attempt, channel in enumerate(channels):
                left = DEADLINE_S - (time.monotonic() - started)
                try:
                    await inference_pb2_grpc.InferenceStub(channel).Generate(
                        request, metadata=metadata, timeout=left)
                    code, details = grpc.StatusCode.OK, ""
                    break
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                    if code is not grpc.StatusCode.UNAVAILABLE or attempt == len(channels) - 1:
                        break
            self.shots.append(Shot(started, time.monotonic(), code, details))
            await asyncio.sleep(0.05)

    def ok_after(self, at: float) -> list[Shot]:
        return [s for s in self.shots if s.started >= at and s.code is grpc.StatusCode.OK]


async def _serving(info: StackInfo, name: str) -> bool:
    async with info.channel(name) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _until(condition, deadline: float, what: str, interval_s: float = 0.1) -> None:
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(interval_s)


def _gateway_metric(info: StackInfo, name: str) -> float:
    with urllib.request.urlopen(f"http://{info.metrics['gateway']}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


async def _drill(stack: Stack, victims: list[str], gateways: list[str] | None = None) -> Traffic:
    """SIGKILLs `victims` under traffic; checks every rule of the drill; returns the traffic."""
    info = stack.info
    assert info is not None
    traffic = Traffic(info, gateways or [info.gateway])
    runner = asyncio.create_task(traffic.run())
    try:
        started = time.monotonic()

        async def steady() -> bool:
            return len(traffic.ok_after(started)) >= 3

        await _until(steady, started + 15, "steady traffic before the kill")
        old = {name: stack.children[name].pid for name in victims}
        killed_at = time.monotonic()
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)

        async def succeeding_again() -> bool:
            return bool(traffic.ok_after(killed_at))

        await _until(succeeding_again, killed_at + SUCCEED_AGAIN_S,
                     f"a generation started after killing {victims} succeeds")

        async def back() -> bool:
            for name, pid in old.items():
                child = stack.children[name]
                if child.pid == pid or not child.alive():
                    return False
                if name in info.endpoints and not await _serving(info, name):
                    return False
            return True

        await _until(back, killed_at + BACK_S, f"{victims} restarted and SERVING", 0.2)
        # Traffic over the restarted process too, then a last look at everything.
        settled = time.monotonic()

        async def after_restart() -> bool:
            return len(traffic.ok_after(settled)) >= 2

        await _until(after_restart, settled + SUCCEED_AGAIN_S, "generations after the restart")
    finally:
        traffic.stopping.set()
        async with asyncio.timeout(DEADLINE_S * 2 + 5):
            await runner
    after = [s for s in traffic.shots if s.started >= killed_at]
    wrong = [s for s in after if s.code is not grpc.StatusCode.OK and s.code not in RETRYABLE]
    late = [s for s in after if s.ended - s.started > DEADLINE_S + 1.0]
    assert not wrong, f"non-retryable failures after killing {victims}: {wrong[:5]}"
    assert not late, f"generations outlived their deadline: {late[:5]}"
    first_ok = min(s.ended for s in traffic.ok_after(killed_at))
    assert first_ok - killed_at <= SUCCEED_AGAIN_S
    return traffic


@pytest.mark.parametrize("victim", ["scheduler", "ratelimit", "registry", "auditor", "sidecar"])
async def test_sigkill_under_traffic_heals(drill_stack: Stack, victim: str):
    restarts_before = drill_stack.supervisor.restarts()[victim]
    await _drill(drill_stack, [victim])
    assert drill_stack.supervisor.restarts()[victim] == restarts_before + 1
    log = (drill_stack.logs / f"{victim}.log").read_text()
    assert "exited with signal SIGKILL" in log and "restarted as pid" in log


async def test_both_schedulers_killed_generations_route_through_the_gateway(drill_stack: Stack):
    info = drill_stack.info
    assert info is not None
    before = _gateway_metric(info, "infermesh_gateway_fallback_routes_total")
    traffic = await _drill(drill_stack, ["scheduler", "scheduler-2"])
    assert _gateway_metric(info, "infermesh_gateway_fallback_routes_total") > before
    failed = [s for s in traffic.shots if s.code is not grpc.StatusCode.OK]
    assert not failed, f"with both schedulers gone the gateway routes by itself: {failed[:5]}"

    async def schedulers_route_again() -> bool:  # the next route that a scheduler answers
        return await _one_generation(info) and _gateway_metric(
            info, "infermesh_gateway_fallback_routing") == 0.0

    await _until(schedulers_route_again, time.monotonic() + 10, "back to the schedulers", 0.3)
    log = (drill_stack.logs / "gateway.log").read_text()
    assert "fallback_routing_started" in log and "fallback_routing_ended" in log


async def _one_generation(info: StackInfo) -> bool:
    async with info.channel() as channel:
        try:
            await inference_pb2_grpc.InferenceStub(channel).Generate(
                inference_pb2.GenerateRequest(model=info.reference_model, prompt="back?",
                                              params=inference_pb2.SamplingParams(max_tokens=2)),
                metadata=(("authorization", f"Bearer {info.api_key}"),), timeout=5)
        except grpc.aio.AioRpcError:
            return False
    return True


async def test_one_of_two_gateways_killed_behind_the_clients_retry(drill_stack: Stack):
    info = drill_stack.info
    assert info is not None
    second = ExtraGateway(info, drill_stack.state_dir, name="gateway-drill")
    await asyncio.to_thread(second.start)
    try:
        await _drill(drill_stack, ["gateway"], gateways=[info.gateway, second.endpoint])
    finally:
        await asyncio.to_thread(second.stop)


async def test_etcd_frozen_under_traffic(drill_stack: Stack):
    """etcd stays one process locally (a three-member cluster in Kubernetes): frozen for 3 s,
    below the services' 5 s lease TTL, every service keeps serving from what it watched."""
    info = drill_stack.info
    assert info is not None
    traffic = Traffic(info, [info.gateway])
    runner = asyncio.create_task(traffic.run())
    pid = drill_stack.children["etcd"].pid
    try:
        await asyncio.sleep(1.0)
        frozen_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        thawed = time.monotonic()

        async def after_thaw() -> bool:
            return len(traffic.ok_after(thawed)) >= 2

        await _until(after_thaw, thawed + SUCCEED_AGAIN_S, "generations after etcd thawed")
    finally:
        traffic.stopping.set()
        async with asyncio.timeout(DEADLINE_S * 2 + 5):
            await runner
    during = [s for s in traffic.shots if frozen_at <= s.started < thawed]
    assert during and all(s.code is grpc.StatusCode.OK for s in during), [
        s for s in during if s.code is not grpc.StatusCode.OK][:5]
