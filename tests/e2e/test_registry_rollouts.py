"""Model rollouts over the real stack, driven by `meshctl registry` as an admin would: push a
model directory with a blob, show/diff/list/history, canary and pins at the gateway, a shadow
copy that the client never sees and is not billed, a rollback visible at two gateways, admin
actions in the audit log, and a non-admin key refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest

from deploy.local.gateways import ExtraGateway
from deploy.local.stack import REPO_ROOT, StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from services.common import etcd
from services.common.records import ReplicaRecord
from services.common.tenancy import Tenant, TenantStore
from services.registry.manifest import served_model_name

pytestmark = pytest.mark.integration
MESHCTL = pathlib.Path(sys.executable).parent / "meshctl"
VERSION = re.compile(r"sha256:[0-9a-f]{64}")
JUDGE_INTERVAL_S = 2.0  # the registry's default canary_check_interval_s


def manifest(name: str, description: str) -> dict:
    return {
        "name": name, "description": description, "tokenizer": "whitespace",
        "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 256,
                   "max_batch_size": 8},
        "sampling": {"max_tokens": 8, "temperature": 0.7, "top_p": 0.95},
        "cost_per_1k_input_tokens": 0.0001, "cost_per_1k_output_tokens": 0.0002,
        "weights": [{"name": "engine.plan"}],
    }


def meshctl(stack: StackInfo, *args: str, key: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, INFERMESH_REGISTRY=stack.endpoints["registry"],
               INFERMESH_API_KEY=key or stack.api_key, INFERMESH_STATE_DIR="/nonexistent",
               **stack.operator_env())
    return subprocess.run([str(MESHCTL), "registry", *args], env=env, input=stdin, text=True,
                          capture_output=True, timeout=60, cwd=REPO_ROOT)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def pushed_version(output: str) -> str:
    found = VERSION.search(output)
    assert found, output
    return found.group(0)


async def generate(stack: StackInfo, gateway: str, key: str, model: str, user: str = "",
                   request_id: str = "") -> inference_pb2.GenerateResponse:
    async with stack.channel("gateway", gateway) as channel:
        return await inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(model=model, prompt="rollout check", user=user,
                                          request_id=request_id,
                                          params=inference_pb2.SamplingParams(max_tokens=2)),
            metadata=(("authorization", f"Bearer {key}"),), timeout=10)


async def wait_serving(stack: StackInfo, gateway: str, key: str, model: str, version: str,
                       within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if (await generate(stack, gateway, key, model)).model_version == version:
                return
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline, f"{gateway} does not serve {version}"
        await asyncio.sleep(0.02)


async def wait_loaded(stack: StackInfo, name: str, version: str, within_s: float = 60.0) -> None:
    """Until a replica serves `version` (as `meshctl replicas` shows): placement loads a new
    canary first; the rollout sends it traffic only then."""
    model = served_model_name(name, version)
    deadline = time.monotonic() + within_s
    async with etcd.connect(stack.etcd, 5.0, stack.client_tls()) as client:
        while not any(model in ReplicaRecord.decode(etcd.decode(kv.value)).models
                      for kv in await client.get_prefix(etcd.Keys.replicas.encode())):
            assert time.monotonic() < deadline, f"no replica loaded {version}"
            await asyncio.sleep(0.1)


def metric(endpoint: str, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def models(stack: StackInfo, tmp_path_factory) -> dict[str, str]:
    """One model, two versions pushed with `meshctl registry push DIR`; the first promoted."""
    name = f"rollout-{uuid.uuid4().hex[:6]}"
    root = tmp_path_factory.mktemp("models")
    ids = {}
    for label in ("v1", "v2"):
        directory = root / label
        directory.mkdir()
        (directory / "engine.plan").write_bytes(os.urandom(300_000))
        (directory / "manifest.json").write_text(json.dumps(manifest(name, f"{name} {label}")))
        ids[label] = pushed_version(ok(meshctl(stack, "push", str(directory))))
    ok(meshctl(stack, "promote", name, ids["v1"], "--reason", "launch"))
    asyncio.run(wait_serving(stack, stack.gateway, stack.api_key, name, ids["v1"]))
    return {"name": name, **ids, "dir": str(root)}


@pytest.fixture(scope="module")
def user_key(stack: StackInfo) -> str:
    async def issue() -> str:
        async with etcd.connect(stack.etcd, 5.0, stack.client_tls()) as client:
            tenants = TenantStore(client)
            tenant = f"r-{uuid.uuid4().hex[:8]}"
            await tenants.put_tenant(Tenant(tenant, "rollout user"))
            key, _ = await tenants.issue_key(tenant, role="user")
            return key

    return asyncio.run(issue())


@pytest.fixture(scope="module")
def second_gateway(stack: StackInfo, stack_dir: pathlib.Path) -> Iterator[str]:
    """Another gateway process on the same etcd: both must follow every routing change."""
    gateway = ExtraGateway(stack, stack_dir)
    gateway.start()
    try:
        yield gateway.endpoint
    finally:
        gateway.stop()


def test_push_show_diff_list_and_history(stack, models, tmp_path):
    name, v1, v2 = models["name"], models["v1"], models["v2"]
    assert "already registered" in ok(meshctl(stack, "push", f"{models['dir']}/v1"))
    exported = ok(meshctl(stack, "show", f"{name}@{v1}", "--json"))
    round_trip = ok(meshctl(stack, "push", "-", stdin=exported))
    assert pushed_version(round_trip) == v1 and "already registered" in round_trip
    shown = ok(meshctl(stack, "show", f"{name}@{v1[7:19]}"))  # a unique prefix does
    assert v1 in shown and "weights[engine.plan].digest" in shown
    assert f"served as the Triton model {served_model_name(name, v1)}" in shown
    diff = ok(meshctl(stack, "diff", f"{name}@{v1}", v2))
    assert f'description: "{name} v1" → "{name} v2"' in diff
    assert "weights[engine.plan].digest" in diff
    listing = ok(meshctl(stack, "list", name))
    assert re.search(rf"{v1} .* production", listing) and v2 in listing
    assert name in ok(meshctl(stack, "list"))
    assert "launch" in ok(meshctl(stack, "history", name))


def test_a_non_admin_key_changes_nothing(stack, models, user_key):
    refused = meshctl(stack, "promote", models["name"], models["v2"], "--reason", "sneaky",
                      key=user_key)
    assert refused.returncode == 4 and "PERMISSION_DENIED" in refused.stderr  # exit 4: auth
    assert models["v1"] in ok(meshctl(stack, "show", models["name"], key=user_key))


async def test_canary_is_sticky_and_pins_are_served(stack, models, user_key):
    name, v1, v2 = models["name"], models["v1"], models["v2"]
    ok(await asyncio.to_thread(meshctl, stack, "canary", name, v2, "--weight", "50",
                               "--reason", "try v2"))
    await wait_loaded(stack, name, v2)
    await wait_serving(stack, stack.gateway, user_key, f"{name}@canary", v2)
    served: dict[str, str] = {}
    for index in range(12):
        user = f"user-{index}"
        first = await generate(stack, stack.gateway, user_key, name, user)
        again = await generate(stack, stack.gateway, user_key, name, user)
        assert first.model_version == again.model_version
        served[user] = first.model_version
    assert set(served.values()) == {v1, v2}
    async with stack.channel() as channel:
        info = await inference_pb2_grpc.InferenceStub(channel).GetModel(
            inference_pb2.GetModelRequest(name=name),
            metadata=(("authorization", f"Bearer {user_key}"),), timeout=5)
    assert (info.production_version, info.canary_version, info.canary_weight_percent) == \
        (v1, v2, 50)
    assert info.routing_revision >= 2 and info.cost_per_1k_output_tokens == 0.0002
    assert (await generate(stack, stack.gateway, user_key, f"{name}@{v1}")).model_version == v1
    production = await generate(stack, stack.gateway, user_key, f"{name}@production")
    assert production.model_version == v1
    ok(await asyncio.to_thread(meshctl, stack, "canary", "clear", name, "--reason", "done"))
    await wait_serving(stack, stack.gateway, user_key, name, v1)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await generate(stack, stack.gateway, user_key, f"{name}@canary")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_shadow_output_never_reaches_the_client_and_is_not_billed(stack, models, user_key):
    name, v1, v2 = models["name"], models["v1"], models["v2"]
    ok(await asyncio.to_thread(meshctl, stack, "shadow", name, v2, "--rate", "1",
                               "--reason", "compare v2"))
    gateway_metrics = stack.metrics["gateway"]
    shadow_ok = {"model": name, "version": v2, "outcome": "ok"}
    before = metric(gateway_metrics, "infermesh_gateway_shadow_generations_total", shadow_ok)
    billed_before = metric(gateway_metrics, "infermesh_gateway_generations_total",
                           {"model": name, "version": v2})
    deadline = time.monotonic() + 10
    while metric(gateway_metrics, "infermesh_gateway_shadow_generations_total",
                 shadow_ok) == before:
        reply = await generate(stack, stack.gateway, user_key, name, request_id=uuid.uuid4().hex)
        assert reply.model_version == v1
        assert time.monotonic() < deadline, "no shadow copy ran"
        await asyncio.sleep(0.05)
    # The copy's tokens are counted apart, per version, and never as the tenant's.
    assert metric(gateway_metrics, "infermesh_gateway_shadow_tokens_total",
                  {"version": v2, "kind": "completion"}) > 0
    assert metric(gateway_metrics, "infermesh_gateway_generations_total",
                  {"model": name, "version": v2}) == billed_before
    ok(await asyncio.to_thread(meshctl, stack, "shadow", "clear", name, "--reason", "enough"))


async def test_rollback_is_served_by_every_gateway(stack, models, user_key, second_gateway):
    name, v1, v2 = models["name"], models["v1"], models["v2"]
    ok(await asyncio.to_thread(meshctl, stack, "promote", name, v2, "--reason", "v2 is better"))
    for gateway in (stack.gateway, second_gateway):
        await wait_serving(stack, gateway, user_key, name, v2)
    rolled = await asyncio.to_thread(meshctl, stack, "rollback", name, "--reason", "errors")
    assert "production  " + v1 in ok(rolled)
    for gateway in (stack.gateway, second_gateway):
        await wait_serving(stack, gateway, user_key, name, v1)
    history = ok(await asyncio.to_thread(meshctl, stack, "history", name))
    assert re.search(r"rollback .* errors", history)


async def canary_traffic(stack: StackInfo, key: str, model: str, requests: int) -> None:
    """Requests from many users (so both arms get some), ten at a time; failures expected."""

    async def one(index: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await generate(stack, stack.gateway, key, model, f"user-{index}")

    for start in range(0, requests, 10):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 10, requests))))


async def test_a_healthy_canary_is_left_alone(stack, models, user_key):
    """Noise: a canary as good as production keeps running through several judgements."""
    name, v2 = models["name"], models["v2"]
    ok(await asyncio.to_thread(meshctl, stack, "canary", name, v2, "--weight", "50",
                               "--reason", "healthy canary"))
    await wait_loaded(stack, name, v2)
    await wait_serving(stack, stack.gateway, user_key, f"{name}@canary", v2)
    await canary_traffic(stack, user_key, name, 60)
    await asyncio.sleep(2 * JUDGE_INTERVAL_S)
    listing = ok(await asyncio.to_thread(meshctl, stack, "list"))
    assert re.search(rf"{name} .* {v2[7:19]}@50%", listing), listing
    ok(await asyncio.to_thread(meshctl, stack, "canary", "clear", name, "--reason", "done"))


async def test_a_canary_that_cannot_load_is_rolled_back_automatically(stack, models, user_key,
                                                                       tmp_path):
    """A canary whose engine fails to load (its weights are not a model): the rollout keeps its
    users on production meanwhile (no request fails), and the registry's judge clears it, saying
    why."""
    name = models["name"]
    broken = manifest(name, f"{name} broken engine")
    broken["engine"] |= {"kind": "torch", "num_blocks": 128, "page_size": 32,
                         "max_batch_tokens": 64}
    (tmp_path / "engine.plan").write_bytes(os.urandom(1000))
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    v3 = pushed_version(ok(await asyncio.to_thread(meshctl, stack, "push", str(tmp_path))))
    ok(await asyncio.to_thread(meshctl, stack, "canary", name, v3, "--weight", "50",
                               "--reason", "try the new engine"))
    deadline = time.monotonic() + 180  # the torch stub starts (imports torch), then fails
    while True:
        for index in range(4):  # every request is answered, by production
            reply = await generate(stack, stack.gateway, user_key, name, f"user-{index}")
            assert reply.model_version == models["v1"]
        history = ok(await asyncio.to_thread(meshctl, stack, "history", name, "--limit", "1"))
        if "clear_canary" in history:
            break
        assert time.monotonic() < deadline, history
        await asyncio.sleep(0.5)
    assert "registry/auto-rollback" in history and "failed to load" in history
    with pytest.raises(grpc.aio.AioRpcError):  # no canary is left to pin
        await generate(stack, stack.gateway, user_key, f"{name}@canary")


async def test_a_versions_safety_policy_ends_the_stream(stack, models, user_key, tmp_path):
    """A version that blocks "the ": its (pinned) generations stop before the phrase."""
    name = models["name"]
    guarded = manifest(name, f"{name} guarded") | {"safety": {"blocked_phrases": ["the "]}}
    (tmp_path / "engine.plan").write_bytes(os.urandom(1000))
    (tmp_path / "manifest.json").write_text(json.dumps(guarded))
    version = pushed_version(ok(await asyncio.to_thread(meshctl, stack, "push", str(tmp_path))))
    deadline = time.monotonic() + 60
    async with stack.channel() as channel:
        # Never promoted: a tenant may not pin it (nor make the mesh load it) without a grant.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await inference_pb2_grpc.InferenceStub(channel).Generate(
                inference_pb2.GenerateRequest(model=f"{name}@{version}", prompt="hi"),
                metadata=(("authorization", f"Bearer {user_key}"),), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        while True:  # pinned by id, it is loaded on demand: UNAVAILABLE (retry) until then
            try:
                reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
                    inference_pb2.GenerateRequest(
                        model=f"{name}@{version}", prompt="tell me a story",
                        params=inference_pb2.SamplingParams(max_tokens=64, seed=3)),
                    metadata=(("authorization", f"Bearer {stack.api_key}"),),  # an admin key
                    timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, "the pinned version was never loaded"
                await asyncio.sleep(0.5)
    assert reply.finish_reason == inference_pb2.CONTENT_FILTER
    assert "the " not in reply.text.lower() and reply.model_version == version


async def test_admin_changes_reach_the_audit_log(stack, models, stack_dir):
    """Every change's audit event leaves the registry's etcd outbox once the auditor has it."""
    name = models["name"]
    async with etcd.connect(stack.etcd, 5.0, stack.client_tls()) as client:
        deadline = time.monotonic() + 15
        while True:
            pending = [kv.key.decode() for kv in await client.get_prefix(
                etcd.Keys.registry_audit_outbox.encode()) if f":{name}:" in kv.key.decode()]
            if not pending:
                break
            assert time.monotonic() < deadline, f"never acknowledged: {pending}"
            await asyncio.sleep(0.1)
    logged = "".join(path.read_text(errors="replace")
                     for path in (stack_dir / "data" / "auditor").rglob("*") if path.is_file())
    assert f"registry:{name}:routing:1" in logged and "registry.promote" in logged
