"""The sidecar beside each Triton server: registers the replica in etcd under a lease.

Every `poll_interval_s` it asks Triton whether it is ready and which models are loaded, and
rewrites `replicas/<id>` when that changes. The key lives under the sidecar's own lease, so a
replica whose sidecar dies disappears from routing within the TTL; on SIGTERM the lease is revoked
first, so no new work is routed here while Triton finishes what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pydantic import Field
from prometheus_client import Gauge
from tritonclient.grpc import aio as triton_aio

from services.common import etcd
from services.common.logs import get_logger
from services.common.runtime import ServiceContext, ServiceParts, main
from services.common.settings import ServiceSettings

log = get_logger(__name__)
READY = Gauge("infermesh_sidecar_triton_ready", "1 when Triton answers ready.", ["replica"])
MODELS = Gauge("infermesh_sidecar_models_ready", "Models loaded and ready.", ["replica"])


class SidecarSettings(ServiceSettings):
    triton_grpc_endpoint: str = Field("127.0.0.1:8001", description="Triton's gRPC host:port.")
    triton_metrics_endpoint: str = Field(
        "127.0.0.1:8002", description="Triton's metrics host:port."
    )
    replica_id: str = Field("replica-0", description="Unique name of this Triton replica.")
    zone: str = Field("local", description="Failure domain, for zone-aware routing.")
    poll_interval_s: float = Field(1.0, description="How often Triton is health-checked.")
    replica_lease_ttl_s: int = Field(5, description="TTL of the lease under the replica key.")
    triton_timeout_s: float = Field(2.0, description="Deadline for each call to Triton.")


async def probe(client: triton_aio.InferenceServerClient, timeout_s: float) -> tuple[bool, list[str]]:
    """(ready, models loaded and READY); (False, []) when Triton does not answer in time."""
    try:
        async with asyncio.timeout(timeout_s):
            if not await client.is_server_ready():
                return False, []
            index = await client.get_model_repository_index(as_json=True)
    except Exception as exc:  # unreachable, or an error status: not ready either way
        log.warning("triton_probe_failed", error=repr(exc))
        return False, []
    models = sorted(m["name"] for m in index.get("models", []) if m.get("state") == "READY")
    return True, models


def replica_record(settings: SidecarSettings, ready: bool, models: list[str]) -> dict[str, Any]:
    return {
        "schema": 1,
        "replica_id": settings.replica_id,
        "grpc_endpoint": settings.triton_grpc_endpoint,
        "metrics_endpoint": settings.triton_metrics_endpoint,
        "zone": settings.zone,
        "models": models,
        "healthy": ready and bool(models),
    }


async def keep_registered(ctx: ServiceContext, settings: SidecarSettings) -> None:
    client = triton_aio.InferenceServerClient(settings.triton_grpc_endpoint)
    lease = etcd.LeaseKeeper(ctx.etcd, settings.replica_lease_ttl_s)
    await lease.start()
    key = etcd.Keys.replica(settings.replica_id)
    published: dict[str, Any] | None = None
    try:
        while not ctx.draining.is_set():
            ready, models = await probe(client, settings.triton_timeout_s)
            READY.labels(settings.replica_id).set(int(ready))
            MODELS.labels(settings.replica_id).set(len(models))
            record = replica_record(settings, ready, models)
            if record != published:
                try:
                    await lease.put(key, record)
                    published = record
                    log.info("replica_published", healthy=record["healthy"], models=models)
                except Exception as exc:  # etcd away: keep probing, publish when it is back
                    log.warning("replica_publish_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.draining.wait(), settings.poll_interval_s)
    finally:
        await lease.close()
        await client.close()
        log.info("replica_withdrawn", replica=settings.replica_id)


async def setup(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings
    assert isinstance(settings, SidecarSettings)
    task = asyncio.create_task(keep_registered(ctx, settings), name="replica registration")

    async def cleanup() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, settings.triton_timeout_s + 5)

    return ServiceParts([], cleanup=cleanup)


if __name__ == "__main__":
    main("sidecar", SidecarSettings(), setup)
