"""etcd access for every service: the keyspace, watch-backed caches and kept-alive leases.

Everything shared lives under `/infermesh/v1/` as JSON. Readers never ask etcd on the hot path:
a `WatchCache` loads a prefix once, then follows it with a watch from the next revision, and
keeps serving its last view while etcd is away (static stability).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import aetcd
from aetcd import rpc as etcd_rpc
from aetcd import watcher as etcd_watcher

from services.common.logs import get_logger
from services.common.tasks import cancel_and_wait

ROOT = "/infermesh/v1/"
log = get_logger(__name__)

T = TypeVar("T")


class Keys:
    """Every etcd key the mesh uses, in one place."""

    tenants = ROOT + "tenants/"
    apikeys = ROOT + "apikeys/"
    models = ROOT + "models/"
    replicas = ROOT + "replicas/"
    replica_load = ROOT + "load/"
    placements = ROOT + "placements/"
    scheduler_leader = ROOT + "scheduler/leader"
    scheduler_demand_prefix = ROOT + "scheduler/demand/"
    services = ROOT + "services/"
    registry_audit_outbox = ROOT + "registry/audit-outbox/"
    budgets = ROOT + "budgets/"

    @staticmethod
    def tenant(tenant_id: str) -> str:
        return f"{Keys.tenants}{tenant_id}"

    @staticmethod
    def apikey(key_hash: str) -> str:
        return f"{Keys.apikeys}{key_hash}"

    @staticmethod
    def model_version(model: str, version_id: str) -> str:
        return f"{Keys.models}{model}/versions/{version_id}"

    @staticmethod
    def model_routing(model: str) -> str:
        return f"{Keys.models}{model}/routing"

    @staticmethod
    def model_history(model: str, sequence: int) -> str:
        return f"{Keys.models}{model}/history/{sequence:020d}"

    @staticmethod
    def model_history_prefix(model: str) -> str:
        return f"{Keys.models}{model}/history/"

    @staticmethod
    def model_versions_prefix(model: str) -> str:
        return f"{Keys.models}{model}/versions/"

    @staticmethod
    def registry_audit_event(event_id: str) -> str:
        return f"{Keys.registry_audit_outbox}{event_id}"

    @staticmethod
    def replica(replica_id: str) -> str:
        return f"{Keys.replicas}{replica_id}"

    @staticmethod
    def load(replica_id: str) -> str:
        """A replica's load report (KV blocks, requests), rewritten by its sidecar under a lease."""
        return f"{Keys.replica_load}{replica_id}"

    @staticmethod
    def placement(replica_id: str) -> str:
        """The models the scheduler's leader wants loaded on a replica (its sidecar applies it)."""
        return f"{Keys.placements}{replica_id}"

    @staticmethod
    def scheduler_demand(instance_id: str) -> str:
        """One scheduler's measured token demand, under its lease (the leader sums them all)."""
        return f"{Keys.scheduler_demand_prefix}{instance_id}"

    @staticmethod
    def budget(month: str, tenant_id: str) -> str:
        return f"{Keys.budgets}{month}/{tenant_id}"

    @staticmethod
    def service(kind: str, instance_id: str) -> str:
        return f"{Keys.services}{kind}/{instance_id}"


class ChannelSecurity(Protocol):
    """What a TLS client of etcd needs (`services.common.tls.MeshTls`; a Protocol, so this
    module, which domain modules import for its keys, stays free of gRPC)."""

    def channel_credentials(self) -> Any: ...

    def peer_options(self, peer_kind: str) -> tuple[tuple[str, Any], ...]: ...


class MutualTlsClient(aetcd.Client):
    """aetcd's client over mutual TLS: aetcd 1.0 dials plaintext only, so this is its
    `connect` with a secure channel (the same stubs and watcher; no etcd user/password, as
    the certificate authenticates). Pinned aetcd; tests/integration/test_mesh_tls.py uses it."""

    def __init__(self, host: str, port: int, timeout_s: float, mesh_tls: ChannelSecurity):
        super().__init__(host=host, port=port, timeout=timeout_s,
                         options=dict(mesh_tls.peer_options("etcd")))
        self._credentials = mesh_tls.channel_credentials()

    async def connect(self) -> None:
        if self._connected.is_set():
            return  # nothing below awaits, so no other task can be half-way through it
        self.channel = etcd_rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                               options=list(self._options.items()))
        self.kvstub = etcd_rpc.KVStub(self.channel)
        self.clusterstub = etcd_rpc.ClusterStub(self.channel)
        self.leasestub = etcd_rpc.LeaseStub(self.channel)
        self.maintenancestub = etcd_rpc.MaintenanceStub(self.channel)
        self._watcher = etcd_watcher.Watcher(etcd_rpc.WatchStub(self.channel),
                                              timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


def connect(endpoint: str, timeout_s: float, mesh_tls: ChannelSecurity | None = None
            ) -> aetcd.Client:
    """A client whose every call has a deadline (`timeout_s`); it connects on first use. With
    `mesh_tls`, over mutual TLS checking the server is `etcd.infermesh` (None: plaintext, a
    development etcd)."""
    host, _, port = endpoint.rpartition(":")
    if mesh_tls is not None:
        return MutualTlsClient(host, int(port), timeout_s, mesh_tls)
    return aetcd.Client(host=host, port=int(port), timeout=timeout_s)


def encode(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> Any:
    return json.loads(raw)


def parse_models_key(suffix: str, raw: bytes) -> dict[str, Any]:
    """A `Keys.models` entry for a watch cache: versions and routing are kept; history stays in
    etcd (read on demand), so it parses to an empty dict."""
    if "/history/" in suffix:
        return {}
    return decode(raw)


class WatchCache(Generic[T]):
    """A local, always-readable copy of one etcd prefix.

    `start()` returns once the first full load is in; after that the copy follows etcd through a
    watch, reloading from scratch when the watch breaks (etcd restart, compaction). Lookups are
    plain dict reads. `on_change` runs after every applied change, with the cache up to date.
    A reload keeps the parsed value of every key whose revision did not change, so a value is
    parsed once per write: a parser may stamp what it parses (e.g. with its arrival time).
    """

    def __init__(
        self,
        client: aetcd.Client,
        prefix: str,
        parse: Callable[[str, bytes], T],
        *,
        on_change: Callable[[], None] | None = None,
        retry_s: float = 0.5,
    ):
        self._client = client
        self._prefix = prefix
        self._parse = parse
        self._on_change = on_change
        self._retry_s = retry_s
        self._items: dict[str, T] = {}
        self._revisions: dict[str, int] = {}  # suffix → the mod revision its item was parsed at
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.revision = 0

    @property
    def items(self) -> dict[str, T]:
        """Suffix (the key without the prefix) → parsed value. Do not mutate."""
        return self._items

    def get(self, suffix: str) -> T | None:
        return self._items.get(suffix)

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"watch {self._prefix}")
        async with asyncio.timeout(timeout_s):
            await self._loaded.wait()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _follow(self) -> None:
        while True:
            try:
                await self._load_and_watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down or watch broken: keep serving, retry
                log.warning("watch_broken", prefix=self._prefix, error=repr(exc))
                await asyncio.sleep(self._retry_s)

    async def _load_and_watch(self) -> None:
        listing = await self._client.get_prefix(self._prefix.encode())
        items: dict[str, T] = {}
        revisions: dict[str, int] = {}
        for kv in listing:
            suffix = kv.key.decode()[len(self._prefix) :]
            if self._revisions.get(suffix) == kv.mod_revision and suffix in self._items:
                items[suffix] = self._items[suffix]  # unchanged since we parsed it
                revisions[suffix] = kv.mod_revision
            elif self._put(items, kv.key, kv.value):
                revisions[suffix] = kv.mod_revision
        self._items, self._revisions = items, revisions
        self.revision = listing.header.revision
        self._loaded.set()
        self._changed()
        watch = await self._client.watch_prefix(
            self._prefix.encode(), start_revision=self.revision + 1
        )
        try:
            async for event in watch:
                suffix = event.kv.key.decode()[len(self._prefix) :]
                if event.kind == "PUT":
                    if self._put(self._items, event.kv.key, event.kv.value):
                        self._revisions[suffix] = event.kv.mod_revision
                else:
                    self._items.pop(suffix, None)
                    self._revisions.pop(suffix, None)
                self.revision = event.kv.mod_revision
                self._changed()
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
        raise ConnectionError("watch ended")

    def _put(self, items: dict[str, T], key: bytes, raw: bytes) -> bool:
        """Parses one value into `items`; False (logged, left out) when it cannot be read."""
        suffix = key.decode()[len(self._prefix) :]
        try:
            items[suffix] = self._parse(suffix, raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bad_etcd_value", key=key.decode(), error=repr(exc))
            return False
        return True

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


class LeaseKeeper:
    """Holds one etcd lease alive and re-creates its keys if the lease is ever lost.

    `put(key, value)` attaches a key to the lease; if etcd expires the lease (we were away longer
    than its TTL), the keeper grants a new one and writes every attached key again.
    """

    def __init__(self, client: aetcd.Client, ttl_s: int):
        self._client = client
        self._ttl_s = ttl_s
        self._lease: Any = None
        self._keys: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._grant()
        self._task = asyncio.create_task(self._keep_alive(), name="lease keepalive")

    async def put(self, key: str, value: Any) -> None:
        raw = encode(value)
        async with self._lock:
            self._keys[key] = raw
            await self._client.put(key.encode(), raw, lease=self._lease)

    async def delete(self, key: str) -> None:
        async with self._lock:
            self._keys.pop(key, None)
            await self._client.delete(key.encode())

    async def close(self) -> None:
        """Stops the keepalive and revokes the lease, so our keys disappear at once."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()

    async def _grant(self) -> None:
        self._lease = await self._client.lease(self._ttl_s)
        for key, raw in self._keys.items():
            await self._client.put(key.encode(), raw, lease=self._lease)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                reply = await self._lease.refresh()
                if reply is None or reply.TTL <= 0:
                    async with self._lock:
                        log.warning("lease_lost_regranting")
                        await self._grant()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease_refresh_failed", error=repr(exc))
