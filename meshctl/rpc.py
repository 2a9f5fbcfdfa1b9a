"""Calling the mesh from meshctl: one channel per command, one error format."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from meshctl.config import endpoint_and_key, service_endpoint, tls_for
from meshctl.exits import fail_error
from services.common import tls

T = TypeVar("T")
TIMEOUT_S = 10.0


Metadata = tuple[tuple[str, str], ...]


def call_with_key(
    service: str, flag: str | None, api_key: str | None,
    operation: Callable[[grpc.aio.Channel, Metadata], Awaitable[T]],
) -> T:
    """Runs `operation(channel, metadata)` against `service` (the gateway, the auditor …) at
    the endpoint its `flag` resolves to, with the API key."""
    endpoint, key = endpoint_and_key(service, flag, api_key)
    return _call(endpoint, service, tls_for(service, flag),
                 (("authorization", f"Bearer {key}"),), operation)


def call_gateway(
    gateway: str | None, api_key: str | None,
    operation: Callable[[grpc.aio.Channel, Metadata], Awaitable[T]],
) -> T:
    """Runs `operation(channel, metadata)` against the gateway, with the API key."""
    return call_with_key("gateway", gateway, api_key, operation)


def call(service: str, flag: str | None,
         operation: Callable[[grpc.aio.Channel, Metadata], Awaitable[T]]) -> T:
    """Runs `operation(channel, ())` against `service` without a key (its certificate, the
    operator's, is what the service checks)."""
    return _call(service_endpoint(service, flag), service, tls_for(service, flag), (),
                 operation)


def _call(endpoint: str, service: str, mesh_tls: tls.MeshTls | None, metadata: Metadata,
          operation: Callable[[grpc.aio.Channel, Metadata], Awaitable[T]]) -> T:
    """Runs `operation(channel, metadata)` on a channel to `endpoint`; on a gRPC error prints
    `CODE: message` (with the RetryInfo delay, if any) and exits with its code (`exits`). The
    public gateway is checked by its address, a mesh service by its identity."""

    async def run() -> T:
        peer = None if service == "gateway" else service
        async with tls.channel(endpoint, peer, mesh_tls) as channel:
            return await operation(channel, metadata)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        fail_error(exc)
