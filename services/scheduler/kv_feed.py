"""The scheduler's side of the KV events: one stream per replica from its sidecar
(`KvEventsService/Subscribe`) into the `KvIndex`.

Every replica whose record names a `sidecar_endpoint` is followed; one that leaves is dropped
from the index. A stream starts with each model's snapshot; a batch that does not follow its
view (a gap), a message that does not decode, a broken stream or `READ_TIMEOUT_S` without a
message (the sidecar sends a heartbeat every `HEARTBEAT_S`) makes the replica's views stale at
once (routing falls back to the approximate index for it) and the stream is opened again, which
starts from snapshots, after a bounded exponential backoff with jitter that starts over only once
a stream has delivered a snapshot the index took (a replica whose snapshot is refused is not
asked again every 0.1 s). Messages are applied one at a time, each a bounded amount of work (a
snapshot in steps), with the loop free between them: a replica that floods events delays its own
view, not routing. Only the models the replica's record serves are indexed: a message for any
other is skipped (the index grows by what the mesh placed, not by what a sidecar names).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable

import grpc
from prometheus_client import Counter, Gauge, Histogram

from infermesh.v1 import kv_events_pb2, kv_events_pb2_grpc
from services.common import tls
from services.common.discovery import CHANNEL_OPTIONS, mesh_token_interceptors
from services.common.kv_event_codec import MAX_FRAME_BYTES, READ_TIMEOUT_S, FrameError, decode
from services.common.kv_events import KvSnapshot
from services.common.logs import get_logger
from services.scheduler.inventory import ReplicaInfo
from services.scheduler.kv_index import KvIndex

__all__ = ["KvFeeds", "retry_delay_s"]

log = get_logger(__name__)
LAG = Histogram("infermesh_scheduler_kv_event_lag_seconds",
                "From an engine publishing a batch of KV events to this scheduler's index "
                "applying it (wall clocks).",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
RESYNCS = Counter("infermesh_scheduler_kv_event_resyncs_total",
                  "Replica streams opened again (each starts from snapshots), by reason.",
                  ["reason"])
BLOCKS = Gauge("infermesh_scheduler_kv_index_blocks",
               "Block entries in the KV index (a block on two replicas counts twice).")
BYTES_PER_MILLION = Gauge("infermesh_scheduler_kv_index_bytes_per_million_blocks",
                          "The KV index's memory per million block entries: its containers "
                          "measured, its entries estimated from a fixed sample.")
RETRY_S = (0.1, 30.0)  # the first retry's delay, and the most any retry waits
MEMORY_EVERY_S = 10.0
MAX_MODEL_NAME_CHARS = 77  # a Triton model's name: the registry's 64-character name, "-", 12 hex
# The stream carries what the engine's socket does: a snapshot of the index's bound is one frame.
FEED_CHANNEL_OPTIONS = (*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", MAX_FRAME_BYTES))


def retry_delay_s(failures: int, draw: Callable[[], float] = random.random) -> float:
    """The wait before reconnecting after `failures` streams in a row that brought no usable
    snapshot: doubling from `RETRY_S[0]` up to `RETRY_S[1]`, the upper half drawn at random
    (so schedulers that lost a replica together do not come back in step)."""
    ceiling = min(RETRY_S[0] * 2 ** min(max(failures - 1, 0), 16), RETRY_S[1])
    return ceiling / 2 + draw() * ceiling / 2


class KvFeeds:
    def __init__(self, index: KvIndex, mesh_tls: tls.MeshTls | None, mesh_token: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self._index = index
        self._tls = mesh_tls
        self._interceptors = (mesh_token_interceptors(mesh_token)
                              if mesh_token and mesh_tls is None else None)
        self._clock = clock
        self._followed: dict[str, tuple[str, asyncio.Task[None]]] = {}  # replica → endpoint
        self._models: dict[str, frozenset[str]] = {}  # replica → the models its record serves
        self._measured_at = 0.0

    def follow(self, replicas: Iterable[ReplicaInfo]) -> None:
        """Follows exactly the replicas given that stream events (the inventory's callback)."""
        streaming = [r for r in replicas if r.sidecar_endpoint]
        wanted = {r.replica_id: r.sidecar_endpoint for r in streaming}
        for replica_id, (endpoint, task) in list(self._followed.items()):
            if wanted.get(replica_id) != endpoint:
                task.cancel()
                del self._followed[replica_id]
                self._models.pop(replica_id, None)
                self._index.drop(replica_id)
        for replica in streaming:
            served = frozenset(m for m in replica.models if len(m) <= MAX_MODEL_NAME_CHARS)
            for model in self._models.get(replica.replica_id, frozenset()) - served:
                self._index.drop(replica.replica_id, model)
            self._models[replica.replica_id] = served
        for replica_id, endpoint in wanted.items():
            if replica_id not in self._followed:
                task = asyncio.create_task(self._follow(replica_id, endpoint),
                                           name=f"kv events {replica_id}")
                self._followed[replica_id] = (endpoint, task)

    async def close(self) -> None:
        tasks = [task for _, task in self._followed.values()]
        self._followed.clear()
        self._models.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, replica_id: str, endpoint: str) -> None:
        failures = 0
        peer = "sidecar" if self._tls is not None else None
        while True:
            channel = tls.channel(endpoint, peer, self._tls, FEED_CHANNEL_OPTIONS,
                                  self._interceptors)
            synced = [False]  # set once the index takes one of this stream's snapshots
            try:
                reason = await self._read(replica_id, channel, synced)
            finally:
                self._index.stale(replica_id)
                await channel.close()
            RESYNCS.labels(reason).inc()
            if reason in ("gap", "bad_message", "oversized"):
                log.warning("kv_events_resync", replica=replica_id, reason=reason)
            failures = 1 if synced[0] else failures + 1
            await asyncio.sleep(retry_delay_s(failures))

    async def _read(self, replica_id: str, channel: grpc.aio.Channel, synced: list[bool]) -> str:
        call = kv_events_pb2_grpc.KvEventsServiceStub(channel).Subscribe(
            kv_events_pb2.SubscribeRequest())
        index = self._index
        try:
            while True:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    message = await call.read()
                if message is grpc.aio.EOF:
                    return "ended"
                try:
                    decoded = decode(message)
                except FrameError:
                    return "bad_message"
                if decoded is None:
                    continue  # a heartbeat
                model, item = decoded
                if model not in self._models.get(replica_id, frozenset()):
                    # Not (yet) a model its record serves: never indexed. Once the record names
                    # it, its next batch finds no view: a gap, and the resync's snapshot.
                    continue
                now = self._clock()
                if isinstance(item, KvSnapshot):
                    for _ in index.snapshot_steps(replica_id, model, item, now):
                        await asyncio.sleep(0)  # a big snapshot leaves routing room
                    if not index.live(replica_id, model):
                        return "oversized"
                    synced[0] = True
                elif index.batch(replica_id, model, item, now, time.time_ns()):
                    LAG.observe(index.views[replica_id, model].lag_s)
                else:
                    return "gap"
                self._measure(now)
                # A read of a message already buffered does not yield: a flooding replica
                # would keep the loop from routing without this.
                await asyncio.sleep(0)
        except TimeoutError:
            return "silent"
        except grpc.aio.AioRpcError as exc:
            return "unavailable" if exc.code() == grpc.StatusCode.UNAVAILABLE else "error"
        finally:
            call.cancel()

    def _measure(self, now: float) -> None:
        if now - self._measured_at < MEMORY_EVERY_S:
            return
        self._measured_at = now
        BLOCKS.set(self._index.blocks())
        BYTES_PER_MILLION.set(self._index.bytes_per_million_blocks())
