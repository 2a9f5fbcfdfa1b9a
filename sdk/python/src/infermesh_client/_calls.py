"""One way to make a call that returns whole (a unary RPC, or a server stream read to its end):
the caller's deadline across attempts, the typed error, and retries of refusals that carry the
server's delay (`RetryPolicy`). Generations, model reads and the admin surface all use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Callable, Optional, TypeVar

import grpc

from infermesh_client._errors import DeadlineExceeded, from_rpc_error
from infermesh_client._retry import RetryPolicy

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


class Deadline:
    """A logical call's deadline on the monotonic clock (None: the server's default)."""

    def __init__(self, timeout: Optional[float]):
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> Optional[float]:
        return None if self.at is None else self.at - time.monotonic()


async def call_with_retries(
    attempt_call: Callable[[Optional[float]], Awaitable[T]], deadline: Deadline,
    policy: RetryPolicy, request_id: str = "",
) -> T:
    """`attempt_call(remaining seconds)` until it returns, or raises the `InfermeshError` of
    the last attempt; a refusal is tried again after the server's delay when `policy` says so.
    `attempt_call` sends the same request (the same ids) on every attempt."""
    attempt, waited = 1, 0.0
    while True:
        remaining = deadline.remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed", request_id=request_id)
        try:
            return await attempt_call(remaining)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, request_id)
        delay = policy.delay(error, attempt, waited, deadline.remaining())
        if delay is None:
            raise error
        await asyncio.sleep(delay)
        attempt, waited = attempt + 1, waited + delay


def serialize(message: Any) -> bytes:
    return message.SerializeToString()
