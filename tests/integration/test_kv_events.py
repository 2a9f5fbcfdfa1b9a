"""KV events from real engines through the real transport: the reference engine in a real Triton
serves them on its socket, the sidecar mirrors them and streams them over gRPC, snapshot first;
schedulers' routers index them and route on what the engines hold (precise)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet, reference_repository
from infermesh.v1 import kv_events_pb2, kv_events_pb2_grpc
from services.common import etcd
from services.common.kv_blocks import prompt_blocks, word_token_ids
from services.common.kv_event_codec import decode
from services.common.kv_events import HeldBlocks, KvEventBatch, KvSnapshot
from services.scheduler.candidates import RouteQuery
from services.scheduler.inventory import ReplicaInfo
from services.scheduler.kv_feed import LAG, RESYNCS, KvFeeds
from services.scheduler.outcome import Outcome
from services.scheduler.routing import Policy, Router, RoutingConfig

pytestmark = pytest.mark.integration

PREFIX = "kv-events-test"
MODEL = "kv"
BLOCK = 8
ENGINE = {"kv_cache_blocks": "24", "kv_block_tokens": str(BLOCK), "decode_step_ms": "1"}


def prompt(topic: str, words: int = 40) -> str:
    return " ".join(f"{topic}{i}" for i in range(words))


def blocks(text: str) -> list[int]:
    return prompt_blocks(word_token_ids(text.split()), BLOCK)


@pytest.fixture(scope="module")
def replicas(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[ReplicaSet]:
    root = tmp_path_factory.mktemp("kv")
    repository = reference_repository(root / "models", [MODEL], ENGINE)
    replica_set = ReplicaSet(root, etcd_server.endpoint, 2, repository, models=[MODEL],
                             id_prefix=PREFIX)
    replica_set.start()
    yield replica_set
    replica_set.stop()


@pytest.fixture(scope="module")
async def replica(etcd_server: EtcdServer, replicas: ReplicaSet):
    async with etcd.connect(etcd_server.endpoint, 5.0) as client:
        await replicas.wait_registered(client, models=[MODEL])
    return replicas.replicas[0]


@pytest.fixture
async def schedulers(replica, replicas: ReplicaSet):
    """Two schedulers' routers (precise), each following every replica's KV events."""
    inventory = [ReplicaInfo(r.replica_id, r.grpc_endpoint, models=frozenset({MODEL}),
                             sidecar_endpoint=r.sidecar_endpoint) for r in replicas.replicas]
    routers = [Router(RoutingConfig(Policy.PRECISE)) for _ in range(2)]
    feeds = [KvFeeds(router.kv, None) for router in routers]
    for feed in feeds:
        feed.follow(inventory)
    yield routers, inventory
    for feed in feeds:
        await feed.close()


def route(router: Router, inventory: list[ReplicaInfo], text: str) -> str:
    query = RouteQuery(MODEL, 10.0, kv_block_hashes=blocks(text), kv_block_tokens=BLOCK)
    reservation = router.route(query, inventory, {}, time.monotonic())
    router.release(reservation.reservation_id, Outcome.OK, time.monotonic())
    return reservation.replica.replica_id


async def until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the index never got there"
        await asyncio.sleep(0.02)


async def generate(endpoint: str, text: str, tokens: int = 2) -> None:
    async def one_request() -> AsyncIterator[dict[str, Any]]:
        inputs = []
        for name, value, datatype in (
            ("text_input", np.array([[text.encode()]], dtype=np.object_), "BYTES"),
            ("max_tokens", np.array([[tokens]], dtype=np.int32), "INT32"),
            ("stream", np.array([[True]], dtype=bool), "BOOL"),
        ):
            item = InferInput(name, list(value.shape), datatype)
            item.set_data_from_numpy(value)
            inputs.append(item)
        yield {"model_name": MODEL, "inputs": inputs}

    async with triton_aio.InferenceServerClient(endpoint) as triton:
        async with asyncio.timeout(20):
            async for _, error in triton.stream_infer(one_request()):
                if error is not None:
                    raise error


class View:
    """One subscriber's view of the model's blocks, checking the order as a scheduler does."""

    def __init__(self, endpoint: str):
        self._channel = grpc.aio.insecure_channel(endpoint)
        self._call = kv_events_pb2_grpc.KvEventsServiceStub(self._channel).Subscribe(
            kv_events_pb2.SubscribeRequest())
        self.held = HeldBlocks()
        self.epoch = self.seq = None
        self.snapshots = 0
        self.first_events: list[Any] = []  # each epoch's first batch's events

    async def until(self, check, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.seq is not None and check(self)):
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                message = await self._call.read()
            decoded = decode(message)
            if decoded is None:
                continue
            model, item = decoded
            assert model == MODEL
            if isinstance(item, KvSnapshot):
                self.snapshots += 1
                self.held.hashes = set(item.block_hashes)
                self.epoch, self.seq = item.epoch, item.seq
                continue
            assert isinstance(item, KvEventBatch) and self.seq is not None, "a batch came first"
            if item.epoch != self.epoch:
                self.first_events.append(item.events)
                self.epoch = item.epoch
            else:
                assert item.seq == self.seq + 1, "a gap on the sidecar's stream"
            self.held.apply(item.events)
            self.seq = item.seq

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close()


async def test_snapshot_then_stream_and_two_subscribers_hold_the_same_view(replica) -> None:
    early = View(replica.sidecar_endpoint)
    first = prompt("alpha")
    await generate(replica.grpc_endpoint, first)
    await early.until(lambda v: set(blocks(first)) <= v.held.hashes)
    late = View(replica.sidecar_endpoint)  # connects after the fact: the snapshot says it all
    await late.until(lambda v: set(blocks(first)) <= v.held.hashes)
    assert late.snapshots == 1
    # Other prompts fill the 24-block pool: the first one's blocks are evicted, and said so.
    for topic in ("beta", "gamma", "delta"):
        await generate(replica.grpc_endpoint, prompt(topic, 70))
    for view in (early, late):
        await view.until(lambda v: not set(blocks(first)) & v.held.hashes
                         and set(blocks(prompt("delta", 70))) <= v.held.hashes)
    await early.until(lambda v: v.seq == late.seq)
    await late.until(lambda v: v.seq == early.seq)
    assert early.held.hashes == late.held.hashes
    await early.close()
    await late.close()


async def test_a_restarted_engine_starts_an_epoch_with_an_empty_cache(replica) -> None:
    view = View(replica.sidecar_endpoint)
    text = prompt("epsilon")
    await generate(replica.grpc_endpoint, text)
    await view.until(lambda v: set(blocks(text)) <= v.held.hashes)
    async with triton_aio.InferenceServerClient(replica.grpc_endpoint) as triton:
        await triton.unload_model(MODEL)
        await triton.load_model(MODEL)
    await view.until(lambda v: not v.held.hashes and (v.first_events or v.snapshots > 1),
                     timeout_s=20.0)
    if view.first_events:
        assert view.first_events[0][0].__class__.__name__ == "AllBlocksCleared"
    await view.close()


async def test_two_schedulers_route_on_what_the_engines_hold_through_eviction_and_restart(
        replicas: ReplicaSet, schedulers) -> None:
    routers, inventory = schedulers
    first, second = (r.replica_id for r in replicas.replicas)
    holder = replicas.replicas[1]
    text = prompt("zeta", 48)

    def held_by(replica_id: str) -> bool:
        return all(router.kv.matches(MODEL, blocks(text)).get(replica_id) == len(blocks(text))
                   for router in routers)

    await generate(holder.grpc_endpoint, text)
    await until(lambda: held_by(second))
    assert [route(router, inventory, text) for router in routers] == [second, second]
    # Evicted (other prompts fill its 24 blocks): it no longer attracts the prompt.
    for topic in ("eta", "theta", "iota"):
        await generate(holder.grpc_endpoint, prompt(topic, 70))
    await until(lambda: all(not router.kv.matches(MODEL, blocks(text)) for router in routers))
    assert [route(router, inventory, text) for router in routers] == [first, first]
    # Held again, then its engine restarts with an empty cache: at once, no more.
    await generate(holder.grpc_endpoint, text)
    await until(lambda: held_by(second))
    assert [route(router, inventory, text) for router in routers] == [second, second]
    async with triton_aio.InferenceServerClient(holder.grpc_endpoint) as triton:
        await triton.unload_model(MODEL)
        await triton.load_model(MODEL)
    await until(lambda: all(not router.kv.matches(MODEL, blocks(text)) and
                            router.kv.live(second, MODEL) for router in routers), 20.0)
    assert [route(router, inventory, text) for router in routers] == [first, first]
    assert LAG.collect()[0].samples  # the lag engine → index is measured


async def test_a_forced_gap_resyncs_from_a_snapshot_and_the_index_matches_the_engine(
        replica, schedulers) -> None:
    routers, _ = schedulers
    index = routers[0].kv
    key = (replica.replica_id, MODEL)
    text = prompt("kappa")
    await generate(replica.grpc_endpoint, text)
    await until(lambda: index.matches(MODEL, blocks(text)).get(replica.replica_id))
    resyncs = RESYNCS.labels("gap")._value.get()
    index.views[key].seq -= 1  # as if a batch was lost: the next one does not follow
    await generate(replica.grpc_endpoint, prompt("lambda"))
    await until(lambda: RESYNCS.labels("gap")._value.get() > resyncs and index.live(*key))
    engine = View(replica.sidecar_endpoint)  # the engine's blocks, as its log holds them
    await engine.until(lambda v: True)
    await until(lambda: index.views[key].seq == engine.seq)
    assert index._held[key] == engine.held.hashes
    assert set(blocks(prompt("lambda"))) <= engine.held.hashes
    await engine.close()
