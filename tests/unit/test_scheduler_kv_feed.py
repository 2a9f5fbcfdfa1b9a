"""The scheduler's KV feed over a real loopback gRPC stream (a stand-in sidecar): what it
indexes, how big a snapshot it takes, how it backs off (review findings, issue 19)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random

import grpc

from infermesh.v1 import kv_events_pb2_grpc
from services.common.kv_event_codec import MAX_FRAME_BYTES, encode
from services.common.kv_events import MAX_VIEW_BLOCKS, KvEventBatch, KvSnapshot
from services.scheduler import kv_feed
from services.scheduler.kv_feed import RETRY_S, KvFeeds, retry_delay_s
from services.scheduler.kv_index import KvIndex
from tests.unit.scheduler_builders import replica


class Sidecar(kv_events_pb2_grpc.KvEventsServiceServicer):
    """Sends its messages, then holds the stream open."""

    def __init__(self, *messages):
        self.messages = messages
        self.subscribed = 0

    async def Subscribe(self, request, context):
        self.subscribed += 1
        for message in self.messages:
            yield message
        await asyncio.sleep(30)


async def following(sidecar: Sidecar, index: KvIndex,
                    models=("m",)) -> tuple[KvFeeds, grpc.aio.Server]:
    server = grpc.aio.server()
    kv_events_pb2_grpc.add_KvEventsServiceServicer_to_server(sidecar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    feeds = KvFeeds(index, None)
    feeds.follow([dataclasses.replace(replica("r", models=models),
                                      sidecar_endpoint=f"127.0.0.1:{port}")])
    return feeds, server


async def stop(feeds: KvFeeds, server: grpc.aio.Server) -> None:
    await feeds.close()
    await server.stop(None)


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def snapshot(count: int, seed: int = 1) -> KvSnapshot:
    draw = random.Random(seed)
    return KvSnapshot(1, 0, 0, tuple(draw.getrandbits(64) for _ in range(count)), 16)


async def test_only_the_records_models_are_indexed_and_a_snapshot_over_4_mb_arrives():
    # 600k random 64-bit hashes are ~6 MB as varints: over gRPC's 4 MB default receive limit.
    big = snapshot(600_000)
    index = KvIndex()
    feeds = await following(Sidecar(encode("forged-" + "x" * 1000, snapshot(10, 2)),
                                    encode("m", big)), index)
    try:
        await wait_for(lambda: index.live("r", "m"))
        assert set(index.views) == {("r", "m")}  # the unserved model never reached the index
        assert index.blocks() == len(set(big.block_hashes))
    finally:
        await stop(*feeds)


async def test_a_snapshot_over_the_bound_is_refused_and_the_feed_backs_off(monkeypatch):
    monkeypatch.setattr(kv_feed, "RETRY_S", (0.2, 30.0))
    index = KvIndex(max_blocks_per_view=5)
    # Before: the refused snapshot was ignored, the next batch found no view (a "gap") and the
    # feed reconnected every 0.1 s.
    sidecar = Sidecar(encode("m", snapshot(10)), encode("m", KvEventBatch(1, 1, 0, ())))
    feeds = await following(sidecar, index)
    try:
        await asyncio.sleep(1.0)
        # 0.1-0.2 s, then 0.2-0.4, 0.4-0.8 between attempts: at most 4 in a second (it was 10).
        assert 1 <= sidecar.subscribed <= 4
        assert not index.views
    finally:
        await stop(*feeds)


def test_retry_delays_double_up_to_the_bound_with_jitter_in_the_upper_half():
    low = [retry_delay_s(n, lambda: 0.0) for n in range(1, 12)]
    high = [retry_delay_s(n, lambda: 1.0) for n in range(1, 12)]
    assert high[0] == RETRY_S[0] and low[0] == RETRY_S[0] / 2
    assert high[1] == 2 * RETRY_S[0] and max(high) == RETRY_S[1] == high[-1]
    assert all(a <= b for a, b in itertools.pairwise(high))
    assert retry_delay_s(10_000, lambda: 1.0) == RETRY_S[1]


def test_a_snapshot_of_the_index_bound_fits_one_frame():
    """One limit from the engine's socket to the index: the largest snapshot the index takes
    (random 64-bit hashes, 10 bytes each as varints) is within the frame and message limit."""
    largest = KvSnapshot(2**63 - 1, 2**63 - 1, 2**63 - 1, (2**64 - 1,) * MAX_VIEW_BLOCKS, 2**31 - 1)
    body = encode("m-" + "0" * 75, largest).ByteSize()
    assert body <= MAX_FRAME_BYTES
