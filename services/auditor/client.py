"""Talking to the auditor: sending events (one batch, one acknowledgement after fsync), and
turning the proofs it returns into objects that check themselves with a public key.

Every emitter (the gateway's spool, the registry's admin outbox) calls `append`; the bench and
other high-rate writers keep one `Append` stream open and pipeline batches themselves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from services.auditor.checkpoints import Checkpoint
from services.auditor.reader import ConsistencyProof, InclusionProof
from services.common import errors


def new_event(source: str, request_id: str, **body: Any) -> auditor_pb2.AuditEvent:
    """An event with a fresh id and the current time; `body` is `generation=…` or `admin=…`.
    The time from `time_ns` (protobuf's `GetCurrentTime` goes through a datetime: 5x dearer)."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    now = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    return auditor_pb2.AuditEvent(event_id=uuid.uuid4().hex, request_id=request_id, time=now,
                                  source=source, **body)


async def append(
    channel: grpc.aio.Channel, events: Sequence[auditor_pb2.AuditEvent], timeout_s: float
) -> auditor_pb2.AppendAck:
    """Stores `events` as one batch; returns once they are durable. Raises the call's
    `grpc.aio.AioRpcError` (INVALID_ARGUMENT: retrying cannot help; else safe to retry, as the
    auditor stores each event id once)."""
    stub = auditor_pb2_grpc.AuditorStub(channel)
    call = stub.Append(iter([auditor_pb2.AppendRequest(events=events)]), timeout=timeout_s)
    acks = [ack async for ack in call]
    if len(acks) != 1:
        raise errors.Internal(f"the auditor answered one batch with {len(acks)} acknowledgements")
    return acks[0]


def checkpoint_from_message(message: auditor_pb2.SignedCheckpoint) -> Checkpoint:
    return Checkpoint(size=message.tree_size, root=message.root_hash, head=message.head_hash,
                      first=message.first_sequence, at=message.time_ms, key_id=message.key_id,
                      signature=message.signature)


def inclusion_from_message(message: auditor_pb2.InclusionProof) -> InclusionProof:
    return InclusionProof(message.sequence, message.line.encode("ascii"), tuple(message.path),
                          checkpoint_from_message(message.checkpoint))


def consistency_from_message(message: auditor_pb2.ConsistencyProof) -> ConsistencyProof:
    return ConsistencyProof(checkpoint_from_message(message.old),
                            checkpoint_from_message(message.new),
                            tuple(message.path))
