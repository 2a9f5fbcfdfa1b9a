"""The gRPC server bootstrap every service runs: health, reflection, metrics, logs, etcd
registration and a graceful shutdown on SIGTERM.

A service provides one `setup` coroutine that adds its servicers to the server and returns a
`ServiceParts`; `run_service` does the rest, in the same order for every service:

    logs, traces → metrics endpoint → etcd client → bind → servicers → health/reflection → start →
    register under a lease → SERVING … SIGTERM → NOT_SERVING → drain (grace) → cleanup → revoke
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aetcd
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge, start_http_server

from services.common import etcd, telemetry, tls
from services.common.callers import AuthorizationInterceptor
from services.common.interceptors import ObservabilityInterceptor
from services.common.logs import configure_logging, get_logger
from services.common.settings import ServiceSettings

log = get_logger(__name__)

CERTIFICATE_EXPIRY = Gauge(
    "infermesh_tls_certificate_expiry_timestamp_seconds",
    "When this process's TLS certificate expires (Unix time): alert well before it, in case "
    "its renewal stalls (a renewal restarts the process on the new certificate).")

# Streams stay open for a whole generation; keepalives find dead peers without waiting for TCP.
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    # Peers keep idle channels alive with pings (discovery.CHANNEL_OPTIONS); without this the
    # server counts those as abuse and closes the channel with GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 1_000),
    ("grpc.so_reuseport", 0),
)


@dataclass
class ServiceContext:
    """What `setup` gets: the server to add servicers to, and the shared clients."""

    settings: ServiceSettings
    server: grpc.aio.Server
    etcd: aetcd.Client
    health: HealthServicer
    endpoint: str = ""  # host:port other services reach this process on
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    tls: tls.MeshTls | None = None  # None: plaintext development


@dataclass
class ServiceParts:
    """What `setup` returns: full gRPC service names (for health and reflection) and cleanup."""

    service_names: Sequence[str]
    cleanup: Callable[[], Awaitable[None]] | None = None


Setup = Callable[[ServiceContext], Awaitable[ServiceParts]]


def server_interceptors(settings: ServiceSettings, tls_on: bool
                        ) -> list[grpc.aio.ServerInterceptor]:
    """Every mesh server's interceptors, outermost first: logs and metrics see refusals too."""
    return [ObservabilityInterceptor(),
            AuthorizationInterceptor(tls_on, settings.mesh_token.get_secret_value())]


async def run_service(kind: str, settings: ServiceSettings, setup: Setup,
                      public: bool = False) -> None:
    """Runs one service until SIGTERM or SIGINT, then shuts it down gracefully. `public`: its
    listener takes clients without certificates (the gateway: API keys authenticate them)."""
    configure_logging(kind, settings.log_level)
    telemetry.configure_tracing(kind, public)  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    mesh_tls = await asyncio.to_thread(tls.MeshTls.load, settings.tls)
    if mesh_tls is None and not settings.mesh_token.get_secret_value():
        log.warning("plaintext_development", hint="no TLS and no mesh token: anyone who "
                    "reaches this process's port may call its service-only methods")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # first, so a stop during start-up is clean
        loop.add_signal_handler(signum, stop.set)
    metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
    metrics_port = metrics_server.server_port
    client = etcd.connect(settings.etcd_endpoint, settings.etcd_timeout_s, mesh_tls)
    server = grpc.aio.server(interceptors=server_interceptors(settings, mesh_tls is not None),
                             options=(
        *SERVER_OPTIONS,
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
    ))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = tls.add_listener(server, f"{settings.host}:{settings.port}", mesh_tls,
                            require_client_certificate=not public)
    endpoint = f"{settings.advertise_host}:{port}"
    context = ServiceContext(settings=settings, server=server, etcd=client, health=health,
                             endpoint=endpoint, tls=mesh_tls)
    parts = await setup(context)
    names = list(parts.service_names)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
    await server.start()
    lease = etcd.LeaseKeeper(client, settings.service_lease_ttl_s)
    await lease.start()
    await lease.put(
        etcd.Keys.service(kind, settings.instance_id),
        {"endpoint": endpoint, "metrics": f"{settings.advertise_host}:{metrics_port}"},
    )
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", endpoint=endpoint, metrics_port=metrics_port)

    if mesh_tls is not None and mesh_tls.cert is not None:
        CERTIFICATE_EXPIRY.set(tls.certificate_expiry(mesh_tls.cert))
    renewal = (None if mesh_tls is None else
               asyncio.create_task(_stop_on_renewal(settings, mesh_tls, stop), name="tls-renewal"))

    await stop.wait()

    if renewal is not None:
        renewal.cancel()
    log.info("draining", grace_s=settings.shutdown_grace_s)
    context.draining.set()
    await health.enter_graceful_shutdown()
    await lease.close()  # no new traffic is routed here once our key is gone
    await server.stop(settings.shutdown_grace_s)
    if parts.cleanup is not None:
        await parts.cleanup()
    with contextlib.suppress(Exception):
        await client.close()
    metrics_server.shutdown()
    await telemetry.shutdown_tracing()
    log.info("stopped")


async def _stop_on_renewal(settings: ServiceSettings, loaded: tls.MeshTls,
                           stop: asyncio.Event) -> None:
    """Drains and stops the process once its TLS files are renewed (after a random wait of up
    to `tls_renewal_spread_s`): its supervisor — kubelet, the embedded stack's — restarts it on
    the new material, before the old certificate expires."""
    await tls.wait_for_renewal(settings.tls, loaded, settings.tls_renewal_check_s)
    delay_s = random.uniform(0.0, settings.tls_renewal_spread_s)
    log.warning("tls_renewed", draining_in_s=round(delay_s, 1))
    await asyncio.sleep(delay_s)
    stop.set()


def main(kind: str, settings: ServiceSettings, setup: Setup, public: bool = False) -> None:
    """The body of every service's `__main__`."""
    asyncio.run(run_service(kind, settings, setup, public))
