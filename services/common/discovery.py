"""Finding other mesh services: their leased registrations under `services/<kind>/`."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import aetcd
import grpc

from services.common import errors, etcd

CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def _parse(_suffix: str, raw: bytes) -> dict[str, Any]:
    return etcd.decode(raw)


class ServiceDirectory:
    """Live endpoints per service kind, with one long-lived channel per endpoint."""

    def __init__(self, client: aetcd.Client):
        self._cache: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
            client, etcd.Keys.services, _parse
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()

    async def start(self) -> None:
        await self._cache.start()

    async def close(self) -> None:
        await self._cache.stop()
        for channel in self._channels.values():
            await channel.close()

    def endpoints(self, kind: str) -> list[str]:
        prefix = f"{kind}/"
        return sorted(
            value["endpoint"] for key, value in self._cache.items.items() if key.startswith(prefix)
        )

    def channel(self, kind: str) -> grpc.aio.Channel:
        """A channel to one live instance of `kind`, taken in turn; Unavailable when none."""
        endpoints = self.endpoints(kind)
        if not endpoints:
            raise errors.Unavailable(f"no {kind} service is registered", retry_after_s=1.0)
        endpoint = endpoints[next(self._turn) % len(endpoints)]
        return self.channel_to(endpoint)

    def channel_to(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
        return channel


def rendezvous_owner(key: str, endpoints: list[str]) -> str:
    """The endpoint `key` belongs to: the highest rendezvous hash, so adding or losing an
    endpoint moves only the keys that it gains or held."""
    return max(endpoints, key=lambda e: hashlib.sha256(f"{key}|{e}".encode()).digest())
