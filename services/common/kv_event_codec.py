"""KV events to and from `infermesh.v1.kv_events` messages: one codec for the engines' socket, the
sidecar's stream and the schedulers, and the frame the socket carries.

A frame is a 4-byte big-endian length and one `SubscribeResponse`; frames over `MAX_FRAME_BYTES`
are refused, and the same bound is the schedulers' gRPC receive limit (gRPC's default, 4 MB, is
a snapshot of ~400k blocks). It holds a snapshot of `kv_events.MAX_VIEW_BLOCKS` blocks (each
hash a varint of at most 10 bytes), the most a scheduler keeps of one engine: one limit from the
engine's socket to the index. A message with no kind is a heartbeat: writers send one after
`HEARTBEAT_S` of silence, so a reader that hears nothing for `READ_TIMEOUT_S` knows its writer
is gone rather than idle.
"""

from __future__ import annotations

import struct

from infermesh.v1 import kv_events_pb2
from services.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
    KvSnapshot,
)

__all__ = ["HEADER_BYTES", "HEARTBEAT", "HEARTBEAT_S", "MAX_FRAME_BYTES", "READ_TIMEOUT_S",
           "FrameError", "decode", "encode", "frame", "frame_length", "parse"]

MAX_FRAME_BYTES = 16 << 20
HEARTBEAT_S = 5.0
READ_TIMEOUT_S = 15.0
_LENGTH = struct.Struct(">I")
HEADER_BYTES = _LENGTH.size
HEARTBEAT = _LENGTH.pack(0)  # a frame with an empty body: a message with no kind


class FrameError(ValueError):
    """A frame or message that is not what the protocol says."""


def _event(event: KvEvent) -> kv_events_pb2.KvEvent:
    if isinstance(event, BlockStored):
        stored = kv_events_pb2.BlockStored(block_hashes=event.block_hashes,
                                           block_size=event.block_size)
        if event.parent_block_hash is not None:
            stored.parent_block_hash = event.parent_block_hash
        return kv_events_pb2.KvEvent(stored=stored)
    if isinstance(event, BlockRemoved):
        return kv_events_pb2.KvEvent(
            removed=kv_events_pb2.BlockRemoved(block_hashes=event.block_hashes))
    return kv_events_pb2.KvEvent(cleared=kv_events_pb2.AllBlocksCleared())


def encode(model: str, item: KvSnapshot | KvEventBatch) -> kv_events_pb2.SubscribeResponse:
    if isinstance(item, KvSnapshot):
        return kv_events_pb2.SubscribeResponse(
            triton_model_name=model, snapshot=kv_events_pb2.KvSnapshot(
                epoch=item.epoch, seq=item.seq, timestamp_ns=item.timestamp_ns,
                block_hashes=item.block_hashes, block_size=item.block_size))
    return kv_events_pb2.SubscribeResponse(
        triton_model_name=model, batch=kv_events_pb2.KvEventBatch(
            epoch=item.epoch, seq=item.seq, timestamp_ns=item.timestamp_ns,
            events=[_event(e) for e in item.events]))


def _decode_event(message: kv_events_pb2.KvEvent) -> KvEvent:
    kind = message.WhichOneof("kind")
    if kind == "stored":
        stored = message.stored
        parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
        return BlockStored(tuple(stored.block_hashes), parent, stored.block_size)
    if kind == "removed":
        return BlockRemoved(tuple(message.removed.block_hashes))
    if kind == "cleared":
        return AllBlocksCleared()
    raise FrameError("a KV event names no kind")


def decode(message: kv_events_pb2.SubscribeResponse
           ) -> tuple[str, KvSnapshot | KvEventBatch] | None:
    """(Triton model, snapshot or batch); None for a heartbeat."""
    kind = message.WhichOneof("kind")
    if kind == "snapshot":
        s = message.snapshot
        return message.triton_model_name, KvSnapshot(s.epoch, s.seq, s.timestamp_ns,
                                                     tuple(s.block_hashes), s.block_size)
    if kind == "batch":
        b = message.batch
        return message.triton_model_name, KvEventBatch(
            b.epoch, b.seq, b.timestamp_ns, tuple(_decode_event(e) for e in b.events))
    return None


def frame(model: str, item: KvSnapshot | KvEventBatch) -> bytes:
    body = encode(model, item).SerializeToString()
    return _LENGTH.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length a frame's header announces; FrameError past `MAX_FRAME_BYTES`."""
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"a KV events frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


def parse(body: bytes) -> tuple[str, KvSnapshot | KvEventBatch] | None:
    """A frame's body, decoded (None: a heartbeat)."""
    message = kv_events_pb2.SubscribeResponse()
    try:
        message.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError
        raise FrameError(f"a KV events frame does not parse: {exc}") from exc
    return decode(message)
