"""meshctl's calls to an internal service the SDK does not cover (the scheduler's replica list,
an operator's read of the mesh's internal API): a channel per command that presents the
operator's certificate and no key, and the one meshctl error format."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from meshctl.config import service_endpoint, tls_for
from meshctl.exits import fail_error
from services.common import tls

T = TypeVar("T")


def call(service: str, flag: str | None,
         operation: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
    """Runs `operation(channel)` against `service` at the endpoint `flag` resolves to, checking
    the server by its mesh identity; on a gRPC error prints `CODE: message` (with the RetryInfo
    delay, if any) and exits with its code (`meshctl.exits`)."""

    async def run() -> T:
        async with tls.channel(service_endpoint(service, flag), service,
                               tls_for(service, flag)) as channel:
            return await operation(channel)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        fail_error(exc)
