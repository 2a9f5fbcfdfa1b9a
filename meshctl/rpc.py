"""Calling the gateway's admin APIs from meshctl: one authenticated channel, one error format."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import typer

from meshctl.config import gateway_and_key

T = TypeVar("T")
TIMEOUT_S = 10.0


def call_gateway(
    gateway: str | None, api_key: str | None,
    operation: Callable[[grpc.aio.Channel, tuple[tuple[str, str], ...]], Awaitable[T]],
) -> T:
    """Runs `operation(channel, metadata)`; on a gRPC error prints `CODE: message`, exits 1."""
    endpoint, key = gateway_and_key(gateway, api_key)
    metadata = (("authorization", f"Bearer {key}"),)

    async def run() -> T:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            return await operation(channel, metadata)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
        raise typer.Exit(1) from None
