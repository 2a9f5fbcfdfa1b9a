"""Rollback propagation: how soon after `meshctl registry rollback` every gateway serves the
previous version.

Two gateways (the stack's and one more) are probed without pause by one client each: unary
one-token generations of a bench model on the reference engine, each answer stamped with the
version that served it. A rollback swaps production and previous, so the rounds alternate
between two versions. Three kinds of rounds:

    API rounds (the Registry's ChangeRouting, what the CLI calls), rollback and promote:
      propagation  = last gateway's first answer from the new target − the call returning
    CLI rounds (the real `meshctl registry rollback` process, as an admin runs it):
      from command = first answer from the previous version − the command starting; this
                     includes the CLI's own Python start-up, most of a second on 2 cores
      CLI wall     = the command starting → the process exiting (the gateways usually serve the
                     previous version before the process has finished exiting)

Answers are stamped when they arrive, so each figure includes one generation's latency: an upper
bound on the routing switch itself.

    .venv/bin/python -m bench.rollback     # its own stack; prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import grpc

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import REPO_ROOT, Stack, StackInfo, StackOptions
from infermesh.v1 import inference_pb2, inference_pb2_grpc, registry_pb2
from services.registry.client import RegistryClient

MODEL = "bench-rollback"
MESHCTL = pathlib.Path(sys.executable).parent / "meshctl"
ROUND_TIMEOUT_S = 30.0


def _manifest(description: str) -> registry_pb2.ModelManifest:
    return registry_pb2.ModelManifest(
        name=MODEL, description=description, tokenizer="whitespace",
        engine=registry_pb2.EngineConfig(kind="reference", context_window=4096,
                                         max_output_tokens=256, max_batch_size=8),
        sampling=registry_pb2.SamplingDefaults(max_tokens=1, temperature=0.7, top_p=0.95),
    )


class Prober:
    """Generates on one gateway without pause; remembers when each version first answered."""

    def __init__(self, stack: StackInfo, gateway: str):
        self._stack = stack
        self._gateway = gateway
        self._metadata = (("authorization", f"Bearer {stack.api_key}"),)
        self.first_seen: dict[str, float] = {}
        self.errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        request = inference_pb2.GenerateRequest(
            model=MODEL, prompt="which version", params=inference_pb2.SamplingParams(max_tokens=1))
        async with self._stack.channel("gateway", self._gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not stop.is_set():
                try:
                    reply = await stub.Generate(request, metadata=self._metadata, timeout=5)
                except grpc.aio.AioRpcError:
                    self.errors += 1
                    await asyncio.sleep(0.01)
                    continue
                self.first_seen.setdefault(reply.model_version, time.monotonic())

    async def wait_for(self, version: str, timeout_s: float) -> float:
        async with asyncio.timeout(timeout_s):
            while version not in self.first_seen:
                await asyncio.sleep(0.001)
        return self.first_seen[version]


async def _rollback_with_cli(stack: StackInfo) -> tuple[float, float]:
    """(started, returned) of one `meshctl registry rollback`."""
    env = dict(os.environ, INFERMESH_REGISTRY=stack.endpoints["registry"],
               INFERMESH_API_KEY=stack.api_key, **stack.operator_env())
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(MESHCTL), "registry", "rollback", MODEL, "--reason", "bench: rollback propagation",
        env=env, cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(ROUND_TIMEOUT_S):
        _, stderr = await process.communicate()
    returned = time.monotonic()
    if process.returncode != 0:
        raise RuntimeError(f"meshctl registry rollback failed: {stderr.decode()}")
    return started, returned


async def _change_with_api(
    registry: RegistryClient, routing: registry_pb2.Routing, how: str
) -> tuple[float, float]:
    """A rollback, or a promote of the previous version (the same routing afterwards, but
    previous is left pointing at what was production)."""
    change = ({"rollback": registry_pb2.Rollback()} if how == "rollback" else
              {"promote": registry_pb2.Promote(version_id=routing.previous)})
    started = time.monotonic()
    await registry.change(MODEL, f"bench: {how} propagation", routing.revision, **change)
    return started, time.monotonic()


async def _round(
    stack: StackInfo, registry: RegistryClient, gateways: list[str], how: str
) -> tuple[float, float, list[float]]:
    """(started, returned, when each gateway first served the previous version) of one
    change (`how`: rollback, promote or cli), with every gateway probed throughout."""
    routing = await registry.routing(MODEL)
    probers = [Prober(stack, gateway) for gateway in gateways]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in probers]
    try:
        for prober in probers:  # every gateway serves the current production first
            await prober.wait_for(routing.production, ROUND_TIMEOUT_S)
        if how == "cli":
            started, returned = await _rollback_with_cli(stack)
        else:
            started, returned = await _change_with_api(registry, routing, how)
        served = [await p.wait_for(routing.previous, ROUND_TIMEOUT_S) for p in probers]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return started, returned, served


async def _measure(
    stack: StackInfo, gateways: list[str], rounds: int, cli_rounds: int
) -> dict[str, float]:
    async with RegistryClient(stack.endpoints["registry"], stack.api_key,
                              mesh_tls=stack.client_tls()) as registry:
        ids = [(await registry.register(_manifest(f"bench rollback {label}"))).version_id
               for label in ("a", "b")]
        routing = await registry.routing(MODEL)
        for version_id in ids:
            if routing.production != version_id:
                routing = (await registry.change(
                    MODEL, "bench setup", routing.revision,
                    promote=registry_pb2.Promote(version_id=version_id))).routing
        propagation_ms, promote_ms, from_command_ms, cli_wall_ms = [], [], [], []
        for _ in range(rounds):
            _, returned, served = await _round(stack, registry, gateways, "rollback")
            propagation_ms.append((max(served) - returned) * 1000)
            _, returned, served = await _round(stack, registry, gateways, "promote")
            promote_ms.append((max(served) - returned) * 1000)
        for _ in range(cli_rounds):
            started, returned, served = await _round(stack, registry, gateways, "cli")
            from_command_ms.append((min(served) - started) * 1000)
            cli_wall_ms.append((returned - started) * 1000)
    return {
        "rollback_rounds": rounds,
        "rollback_gateways": len(gateways),
        "rollback_propagation_ms_max": round(max(propagation_ms), 1),
        "rollback_propagation_ms_p50": round(statistics.median(propagation_ms), 1),
        "promote_propagation_ms_max": round(max(promote_ms), 1),
        "promote_propagation_ms_p50": round(statistics.median(promote_ms), 1),
        "rollback_cli_rounds": cli_rounds,
        "rollback_first_generation_from_command_ms_p50": round(
            statistics.median(from_command_ms), 1),
        "rollback_first_generation_from_command_ms_max": round(max(from_command_ms), 1),
        "rollback_cli_wall_ms_p50": round(statistics.median(cli_wall_ms), 1),
    }


def run(
    stack: StackInfo, state_dir: pathlib.Path, rounds: int = 20, cli_rounds: int = 5
) -> dict[str, float]:
    """Starts a second gateway, measures the rollbacks, stops it."""
    second = ExtraGateway(stack, state_dir)
    second.start()
    try:
        return asyncio.run(
            _measure(stack, [stack.gateway, second.endpoint], rounds, cli_rounds))
    finally:
        second.stop()


def main() -> None:
    from bench.__main__ import BENCH_PLAN  # the bench tenant, not the quota, sets the pace

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cli-rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        stack = Stack(StackOptions(state_dir=pathlib.Path(state), demo_plan=BENCH_PLAN))
        info = stack.up()
        try:
            figures = run(info, pathlib.Path(state), args.rounds, args.cli_rounds)
        finally:
            stack.down()
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
