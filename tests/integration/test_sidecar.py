"""The sidecar against a real etcd and real Triton servers (reference engines), three replicas
started once for the module by `deploy/local/replicas.py`: replica-0 for the record, the load
and placements, replica-1 for the drain on SIGTERM, replica-2 for a lost node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aetcd
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from backends.triton.calibration import EngineProfile
from backends.triton.launcher import stub_pids
from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet, reference_repository
from services.common import etcd
from services.common.records import PlacementRecord

pytestmark = pytest.mark.integration

PREFIX = "sidecar-test"
# Slow decode steps, so a generation is still running while the test looks at it.
ENGINE = {"decode_step_ms": "10"}


@pytest.fixture(scope="module")
def replicas(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[ReplicaSet]:
    root = tmp_path_factory.mktemp("replicas")
    repository = reference_repository(root / "models", ["alpha", "beta"], ENGINE)
    profile = root / "alpha-profile.json"  # as `meshctl engine calibrate` writes it
    profile.write_text(EngineProfile(
        model="alpha", version_id="sha256:" + "0" * 64, triton_model_name="alpha",
        prefill_us_per_token=50.0, decode_step_ms=10.0, decode_step_ms_per_request=0.2,
        max_active_requests=32, kv_tokens_per_block=64, kv_blocks_per_request=1.0,
        kv_request_tokens=64).to_json())
    replica_set = ReplicaSet(root, etcd_server.endpoint, 3, repository, models=["alpha"],
                             id_prefix=PREFIX,
                             sidecar_env={"INFERMESH_DRAIN_TIMEOUT_S": "60",
                                          "INFERMESH_ENGINE_PROFILES": json.dumps([str(profile)])})
    replica_set.start()
    yield replica_set
    replica_set.stop()
    for replica in replica_set.replicas:
        assert not replica.sidecar.alive() and not replica.triton.running()


@pytest.fixture(scope="module")
async def client(etcd_server: EtcdServer, replicas: ReplicaSet) -> AsyncIterator[aetcd.Client]:
    async with etcd.connect(etcd_server.endpoint, 5.0) as etcd_client:
        await replicas.wait_registered(etcd_client, models=["alpha"])
        yield etcd_client


async def read(client: aetcd.Client, key: str) -> dict[str, Any] | None:
    value = await client.get(key.encode())
    return None if value is None else etcd.decode(value.value)


async def eventually(client: aetcd.Client, key: str, check: Any, timeout_s: float = 30.0
                     ) -> dict[str, Any]:
    """Polls `key` until `check(value)` holds; the last value is in the failure message."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read(client, key)
        if value is not None and check(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{key} never satisfied the check; last value: {json.dumps(value)}")
        await asyncio.sleep(0.05)


def active(load: dict[str, Any], model: str) -> int | None:
    """Requests running on `model` per a load report; None while the report lacks the model."""
    return load["models"].get(model, {}).get("active")


def generation_inputs(tokens: int) -> list[InferInput]:
    """A streamed request for exactly `tokens` tokens (min_tokens = max_tokens)."""
    inputs = []
    for name, value, datatype in (
        ("text_input", np.array([[b"Tell me about the sea."]], dtype=np.object_), "BYTES"),
        ("max_tokens", np.array([[tokens]], dtype=np.int32), "INT32"),
        ("min_tokens", np.array([[tokens]], dtype=np.int32), "INT32"),
        ("stream", np.array([[True]], dtype=bool), "BOOL"),
    ):
        item = InferInput(name, list(value.shape), datatype)
        item.set_data_from_numpy(value)
        inputs.append(item)
    return inputs


async def generate(endpoint: str, model: str, tokens: int) -> int:
    """Streams one generation to its end (the server closes the stream); returns the number of
    output tokens the final response reports."""

    async def one_request() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": generation_inputs(tokens)}

    final_tokens = None
    async with triton_aio.InferenceServerClient(endpoint) as triton:
        async for result, error in triton.stream_infer(one_request()):
            if error is not None:
                raise error
            parameters = result.get_response().parameters
            if parameters["triton_final_response"].bool_param:
                final_tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
    assert final_tokens is not None, "the stream ended without a final response"
    return final_tokens


async def test_record_and_load_report_carry_the_contract_fields(
    client: aetcd.Client, replicas: ReplicaSet
) -> None:
    replica = replicas[f"{PREFIX}-0"]
    record = await read(client, etcd.Keys.replica(replica.replica_id))
    assert record is not None
    assert record == {
        "schema": 1, "replica_id": replica.replica_id, "grpc_endpoint": replica.grpc_endpoint,
        "metrics_endpoint": replica.metrics_endpoint,
        "sidecar_endpoint": replica.sidecar_endpoint, "zone": "zone-a", "gpu_type": "cpu",
        "gpu_memory_mib": 8192, "models": ["alpha"], "versions": {"alpha": "1"},
        "version_ids": {},  # loaded as the repository has it, not from the registry
        "kv": record["kv"],
        "capacity": {"alpha": {"prefill_tokens_per_s": 20_000.0,
                               "decode_tokens_per_s": pytest.approx(32 * 1e3 / 16.4)}},
        "ready": True, "healthy": True, "draining": False, "placement_errors": {},
    }
    if record["kv"]:  # the engine exports its KV cache: both capacity figures are there
        assert set(record["kv"]["alpha"]) == {"max_blocks", "tokens_per_block"}
    assert (await read(client, etcd.Keys.replica(f"{PREFIX}-1")))["zone"] == "zone-b"
    load = await read(client, etcd.Keys.load(replica.replica_id))
    assert load is not None
    assert load["schema"] == 1 and load["replica_id"] == replica.replica_id
    assert abs(load["at"] - time.time()) < 30
    assert set(load["models"]) == {"alpha"}
    assert {"active", "waiting", "max"} <= set(load["models"]["alpha"])
    assert load["models"]["alpha"]["active"] == 0
    # Rewritten at least every second even when nothing changes: the report stays fresh.
    later = await eventually(client, etcd.Keys.load(replica.replica_id),
                             lambda value: value["at"] > load["at"])
    assert later["models"] == load["models"]


async def test_load_follows_a_running_generation(client: aetcd.Client,
                                                 replicas: ReplicaSet) -> None:
    replica = replicas[f"{PREFIX}-0"]
    key = etcd.Keys.load(replica.replica_id)
    generation = asyncio.create_task(generate(replica.grpc_endpoint, "alpha", 200))
    busy = await eventually(client, key, lambda v: active(v, "alpha") == 1)
    if "kv_used_blocks" in busy["models"]["alpha"]:
        assert busy["models"]["alpha"]["kv_used_blocks"] > 0
    assert await generation == 200
    await eventually(client, key, lambda v: active(v, "alpha") == 0)


async def test_placement_loads_and_unloads_and_reports_a_bad_model(
    client: aetcd.Client, replicas: ReplicaSet
) -> None:
    replica_id = f"{PREFIX}-0"
    key = etcd.Keys.replica(replica_id)
    placement = etcd.Keys.placement(replica_id)
    try:
        await client.put(placement.encode(), etcd.encode(
            PlacementRecord(frozenset(["alpha", "beta", "no-such-model"]), 1).encode()))
        record = await eventually(client, key, lambda v: v["models"] == ["alpha", "beta"]
                                  and "no-such-model" in v["placement_errors"])
        assert record["healthy"] and record["versions"] == {"alpha": "1", "beta": "1"}
        assert "no-such-model" in record["placement_errors"]["no-such-model"]
        assert set(record["placement_errors"]) == {"no-such-model"}
        # beta was loaded by the placement: it serves.
        assert await generate(replicas[replica_id].grpc_endpoint, "beta", 3) == 3

        await client.put(placement.encode(), etcd.encode(
            PlacementRecord(frozenset(["beta"]), 2).encode()))
        record = await eventually(client, key, lambda v: v["models"] == ["beta"])
        assert record["placement_errors"] == {}  # the bad model is no longer asked for
        load = await eventually(client, etcd.Keys.load(replica_id),
                                lambda v: set(v["models"]) == {"beta"})
        assert set(load["models"]) == {"beta"}
    finally:  # back to what the other tests expect
        await client.put(placement.encode(), etcd.encode(
            PlacementRecord(frozenset(["alpha"]), 3).encode()))
        await eventually(client, key, lambda v: v["models"] == ["alpha"])
        await client.delete(placement.encode())


async def test_a_crashed_engine_process_is_restarted(client: aetcd.Client,
                                                     replicas: ReplicaSet) -> None:
    """A stub that dies leaves Triton calling the model READY while failing every request: the
    sidecar's probe finds it and restarts the model, which serves again."""
    replica = replicas[f"{PREFIX}-0"]
    [crashed] = stub_pids(replica.triton.workdir, "alpha")
    os.kill(crashed, signal.SIGSEGV)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert await generate(replica.grpc_endpoint, "alpha", 3) == 3
            if stub_pids(replica.triton.workdir, "alpha") != [crashed]:
                break
        except Exception as exc:  # failing (the stub is gone) or unloaded while it restarts
            assert time.monotonic() < deadline, f"alpha never served again: {exc!r}"
        assert time.monotonic() < deadline, "alpha never restarted"
        await asyncio.sleep(0.2)
    assert "engine_gone_restarting" in replica.sidecar.log_tail(200)
    await eventually(client, etcd.Keys.replica(replica.replica_id),
                     lambda v: v["models"] == ["alpha"] and not v["placement_errors"])


async def test_sigterm_drains_in_flight_generations_before_the_lease_goes(
    client: aetcd.Client, replicas: ReplicaSet
) -> None:
    replica = replicas[f"{PREFIX}-1"]
    record_key, load_key = (etcd.Keys.replica(replica.replica_id),
                            etcd.Keys.load(replica.replica_id))
    events: list[tuple[str, int, dict[str, Any] | None]] = []
    watch = await client.watch(record_key.encode())

    async def follow() -> None:
        async for event in watch:
            value = etcd.decode(event.kv.value) if event.kind == "PUT" else None
            events.append((event.kind, event.kv.mod_revision, value))
            if event.kind == "DELETE":
                return

    follower = asyncio.create_task(follow())
    try:
        generation = asyncio.create_task(generate(replica.grpc_endpoint, "alpha", 300))
        await eventually(client, load_key, lambda v: active(v, "alpha") == 1)
        replica.sidecar.process.send_signal(signal.SIGTERM)
        draining = await eventually(client, record_key, lambda v: v["draining"])
        assert draining["healthy"] and draining["models"] == ["alpha"]
        # No started generation is lost: it runs to the end while the replica drains.
        assert await generation == 300
        finished = (await client.put(f"{PREFIX}/marker".encode(), b"done")).header.revision
        async with asyncio.timeout(30):
            await follower
    finally:
        await watch.cancel()
    assert await read(client, record_key) is None and await read(client, load_key) is None
    kinds = [kind for kind, _, _ in events]
    assert kinds[-1] == "DELETE" and "PUT" in kinds
    drained_at = next(rev for kind, rev, value in events if kind == "PUT" and value["draining"])
    assert drained_at < finished < events[-1][1], events  # draining, generation done, lease gone
    await asyncio.to_thread(replica.sidecar.process.wait, 30)
    assert replica.sidecar.process.returncode == 0, replica.sidecar.log_tail()


async def test_a_killed_replica_disappears_within_its_lease(client: aetcd.Client,
                                                            replicas: ReplicaSet) -> None:
    replica_id = f"{PREFIX}-2"
    assert await read(client, etcd.Keys.replica(replica_id)) is not None
    await asyncio.to_thread(replicas.kill, replica_id)
    deadline = time.monotonic() + 15
    while await read(client, etcd.Keys.replica(replica_id)) is not None:
        assert time.monotonic() < deadline, "the record outlived its lease"
        await asyncio.sleep(0.1)
    assert await read(client, etcd.Keys.load(replica_id)) is None
    assert not replicas[replica_id].triton.running()
