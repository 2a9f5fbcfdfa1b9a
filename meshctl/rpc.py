"""Calling the mesh from meshctl: one channel per command, one error format."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from meshctl.config import gateway_and_key
from meshctl.exits import fail_error

T = TypeVar("T")
TIMEOUT_S = 10.0


Metadata = tuple[tuple[str, str], ...]


def call_gateway(
    gateway: str | None, api_key: str | None,
    operation: Callable[[grpc.aio.Channel, Metadata], Awaitable[T]],
) -> T:
    """Runs `operation(channel, metadata)` against the gateway, with the API key."""
    endpoint, key = gateway_and_key(gateway, api_key)
    return call(endpoint, (("authorization", f"Bearer {key}"),), operation)


def call(endpoint: str, metadata: Metadata,
         operation: Callable[[grpc.aio.Channel, Metadata], Awaitable[T]]) -> T:
    """Runs `operation(channel, metadata)` on a channel to `endpoint`; on a gRPC error prints
    `CODE: message` (with the RetryInfo delay, if any) and exits with its code (`exits`)."""

    async def run() -> T:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            return await operation(channel, metadata)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        fail_error(exc)
