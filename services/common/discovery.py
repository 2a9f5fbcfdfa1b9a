"""Finding other mesh services: their leased registrations under `services/<kind>/`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
from collections.abc import Sequence
from typing import Any

import aetcd
import grpc

from services.common import errors, etcd, telemetry, tls

CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A peer that died and came back (restarted by its supervisor, on the same port) is dialled
    # again within 2 s, not after gRPC's default backoff of up to 120 s.
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


MESH_TOKEN_HEADER = "x-infermesh-mesh-token"


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (MESH_TOKEN_HEADER, token))
    return details._replace(metadata=metadata)


# grpc.aio files each interceptor under the first call shape it implements, so each shape needs
# its own object.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _StreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._token), request_iterator)


class _StreamStreamToken(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._token), request_iterator)


def mesh_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the mesh token to every call, whatever its shape."""
    return [cls(token) for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken,
                                   _StreamStreamToken)]


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    value = telemetry.traceparent()
    if not value:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("traceparent", value))
    return details._replace(metadata=metadata)


class _UnaryUnaryTrace(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_trace(details), request)


class _UnaryStreamTrace(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_trace(details), request)


def trace_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send the current context as `traceparent` on single-request
    calls; none when tracing is off, so an untraced channel has no interceptor at all. Streams
    are left out: one carries many generations' messages (RouteStream's routes carry their
    own)."""
    if not telemetry.enabled():
        return []
    return [_UnaryUnaryTrace(), _UnaryStreamTrace()]


def mesh_token_matches(metadata: Sequence[tuple[str, Any]] | None, token: str) -> bool:
    """Whether a call carries the mesh token (always true when the mesh has none)."""
    if not token:
        return True
    sent = dict(metadata or ()).get(MESH_TOKEN_HEADER, "")
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(), token.encode())


def _parse(_suffix: str, raw: bytes) -> dict[str, Any]:
    return etcd.decode(raw)


class ServiceDirectory:
    """Live endpoints per service kind, with one long-lived channel per endpoint: mutual TLS
    checking the server is the kind registered there, or in plaintext development calls that
    carry `mesh_token` when there is one. The channel to an endpoint that left the directory is
    closed, after `departed_grace_s` for the calls still on it, so a mesh whose peers come and go
    (autoscaling, rolling restarts on new ports) does not keep a channel per endpoint it ever
    saw."""

    def __init__(self, client: aetcd.Client, mesh_tls: tls.MeshTls | None,
                 mesh_token: str = "", *, departed_grace_s: float = 30.0):
        self._cache: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
            client, etcd.Keys.services, _parse, on_change=self._close_departed
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._departed_grace_s = departed_grace_s
        self._turn = itertools.count()
        self._tls = mesh_tls
        self._interceptors = [
            *(mesh_token_interceptors(mesh_token) if mesh_token and mesh_tls is None else ()),
            *trace_interceptors()] or None

    async def start(self) -> None:
        await self._cache.start()

    async def close(self) -> None:
        await self._cache.stop()
        for task in list(self._closing):
            task.cancel()
        for channel in self._channels.values():
            await channel.close()

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    def _close_departed(self) -> None:
        live = {value["endpoint"] for value in self._cache.items.values()}
        for endpoint in [e for e in self._channels if e not in live]:
            channel = self._channels.pop(endpoint)
            task = asyncio.create_task(channel.close(grace=self._departed_grace_s),
                                       name=f"close channel {endpoint}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

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
        """A channel to `endpoint`, one of `endpoints(kind)`; Unavailable once it is gone."""
        channel = self._channels.get(endpoint)
        if channel is None:
            kind = self._kind_at(endpoint) if self._tls is not None else None
            channel = tls.channel(endpoint, kind, self._tls, CHANNEL_OPTIONS, self._interceptors)
            self._channels[endpoint] = channel
        return channel

    def _kind_at(self, endpoint: str) -> str:
        """The kind registered at `endpoint`: the identity its certificate must carry."""
        for key, value in self._cache.items.items():
            if value["endpoint"] == endpoint:
                return key.partition("/")[0]
        raise errors.Unavailable(f"no service is registered at {endpoint}", retry_after_s=1.0)


def rendezvous_order(key: str, endpoints: list[str]) -> list[str]:
    """The endpoints by their rendezvous hash for `key`, highest first: the first owns the key,
    the next is where it goes if the first is lost (and where a caller may fail over)."""
    return sorted(endpoints, key=lambda e: hashlib.sha256(f"{key}|{e}".encode()).digest(),
                  reverse=True)


def rendezvous_owner(key: str, endpoints: list[str]) -> str:
    """The endpoint `key` belongs to, so adding or losing an endpoint moves only the keys that
    it gains or held."""
    return rendezvous_order(key, endpoints)[0]
