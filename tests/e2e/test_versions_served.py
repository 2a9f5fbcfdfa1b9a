"""A pushed version is what replicas serve: the demo model's second set of weights, pushed as a
Hugging Face directory with `meshctl registry push`, answers with its own bytes once pinned,
canaried or promoted — at two gateways — and a rollback returns to the first version's answers
with no model load in between (the previous version stayed warm as its own Triton model).

The stack's replica has none of the new version's files before the push: its sidecar fetches
them from the registry (no shared filesystem), verifies and renders them when placement asks."""

from __future__ import annotations

import asyncio
import pathlib
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from services.registry.client import RegistryClient
from services.registry.manifest import served_model_name
from tests.e2e.model_variants import QUESTION, demo_model_dir, greedy_answer, write_variant
from tests.e2e.test_registry_rollouts import meshctl, ok, pushed_version

pytestmark = pytest.mark.integration
COLD_START_S = 240.0  # push → fetch 540 MB → verify → render → load, on a busy 2-core machine


@pytest.fixture(scope="module")
def second_gateway(stack: StackInfo, stack_dir: pathlib.Path) -> Iterator[str]:
    gateway = ExtraGateway(stack, stack_dir, name="gateway-versions")
    gateway.start()
    try:
        yield gateway.endpoint
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str, str]:
    """(the variant's directory, its greedy answer in process, the original's)."""
    directory = write_variant(tmp_path_factory.mktemp("variant") / "demo-chat")
    return directory, greedy_answer(directory), greedy_answer(demo_model_dir())


async def ask(gateway: str, stack: StackInfo, model: str, user: str = "",
              max_tokens: int = 32) -> inference_pb2.GenerateResponse:
    async with stack.channel("gateway", gateway) as channel:
        return await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                model=model, user=user,
                messages=inference_pb2.Messages(messages=[
                    inference_pb2.ChatMessage(role="user", content=QUESTION)]),
                params=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)),
            metadata=(("authorization", f"Bearer {stack.api_key}"),), timeout=120)


async def served_by(gateway: str, stack: StackInfo, model: str, version: str,
                    within_s: float) -> inference_pb2.GenerateResponse:
    """The first answer to `model` that `version` gives; UNAVAILABLE (not loaded yet) retried."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            reply = await ask(gateway, stack, model)
            if reply.model_version == version:
                return reply
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert time.monotonic() < deadline, f"{gateway} never served {version} for {model}"
        await asyncio.sleep(0.5)


def model_loads(stack: StackInfo) -> float:
    """Models the stack's sidecar has loaded into Triton so far."""
    with urllib.request.urlopen(f"http://{stack.metrics['sidecar']}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("infermesh_sidecar_placement_actions_total{")
               and 'action="load"' in line and 'outcome="ok"' in line)


async def test_a_pushed_version_serves_its_own_weights_through_pin_canary_promote_rollback(
    stack: StackInfo, second_gateway: str, variant: tuple[pathlib.Path, str, str],
):
    directory, v2_answer, v1_answer = variant
    assert v1_answer != v2_answer  # the weights differ where it shows
    async with RegistryClient(stack.endpoints["registry"], stack.api_key,
                              mesh_tls=stack.client_tls()) as registry:
        v1 = (await registry.version(f"{stack.model}@production")).version_id
    pushed = ok(await asyncio.to_thread(meshctl, stack, "push", str(directory),
                                        "--name", stack.model))
    v2 = pushed_version(pushed.splitlines()[-1])
    assert v2 != v1
    # Pinned, before any rollout: placed on demand, fetched by the replica, its own answer.
    pinned = await served_by(stack.gateway, stack, f"{stack.model}@{v2}", v2, COLD_START_S)
    assert pinned.text == v2_answer
    assert (await ask(stack.gateway, stack, stack.model)).text == v1_answer  # the alias: v1
    # A 50 % canary splits by user, and each user always gets the same version.
    ok(await asyncio.to_thread(meshctl, stack, "canary", stack.model, v2, "--weight", "50",
                               "--reason", "try v2"))
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while set(seen.values()) != {v1, v2}:
        assert time.monotonic() < deadline, f"the canary never split: {seen}"
        user = f"user-{len(seen)}"
        seen[user] = (await ask(stack.gateway, stack, stack.model, user, max_tokens=1)
                      ).model_version
    for user, version in seen.items():
        assert (await ask(stack.gateway, stack, stack.model, user, 1)).model_version == version
    # Promoted: both gateways answer with v2's weights.
    ok(await asyncio.to_thread(meshctl, stack, "promote", stack.model, v2, "--reason", "ship"))
    for gateway in (stack.gateway, second_gateway):
        assert (await served_by(gateway, stack, stack.model, v2, 30)).text == v2_answer
    # Rolled back: v1's answers again, and no model was loaded for it (it stayed warm).
    loads = await asyncio.to_thread(model_loads, stack)
    ok(await asyncio.to_thread(meshctl, stack, "rollback", stack.model, "--reason", "undo"))
    for gateway in (stack.gateway, second_gateway):
        assert (await served_by(gateway, stack, stack.model, v1, 10)).text == v1_answer
    assert await asyncio.to_thread(model_loads, stack) == loads
    assert served_model_name(stack.model, v2) != stack.triton_models[stack.model]
