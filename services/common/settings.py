"""Process settings: one object per process, read once from `INFERMESH_*` environment variables."""

from __future__ import annotations

import os
import pathlib
import socket

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.tls import TlsSettings


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    """What every service process needs; each service subclasses it with its own fields."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", extra="ignore")

    etcd_endpoint: str = Field("127.0.0.1:2379", description="host:port of an etcd client URL.")
    etcd_timeout_s: float = Field(2.0, description="Deadline for every single etcd call.")
    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(0, description="gRPC port; 0 lets the OS pick one.")
    advertise_host: str = Field("127.0.0.1", description="Host other services dial to reach us.")
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 lets the OS pick one.")
    instance_id: str = Field(default_factory=default_instance_id, description="Unique per process.")
    service_lease_ttl_s: int = Field(5, description="TTL of the lease under our etcd registration.")
    shutdown_grace_s: float = Field(10.0, description="How long SIGTERM lets open RPCs drain.")
    reflection: bool = Field(True, description="Serve gRPC reflection (grpcurl, evans).")
    log_level: str = Field("info", description="debug | info | warning | error")
    peer_timeout_s: float = Field(2.0, description="Deadline for a call to another mesh service.")
    max_connection_age_s: float = Field(
        3600.0, gt=0, description="A client connection's longest life: past it the server sends "
        "GOAWAY (clients reconnect for new calls, which also spreads them over new replicas).")
    max_connection_age_grace_s: float = Field(
        660.0, ge=0, description="How long calls open at GOAWAY may still run before the "
        "connection is closed (the longest generation deadline plus a margin).")
    tls: TlsSettings = Field(
        default_factory=TlsSettings, description="INFERMESH_TLS_*: mode, CA, certificate, key.")
    tls_renewal_check_s: float = Field(
        30.0, gt=0, description="How often the TLS files are read again: renewed material "
        "(cert-manager rotates certificates before they expire) drains and stops the process, "
        "which its supervisor restarts on the new files.")
    tls_renewal_spread_s: float = Field(
        300.0, ge=0, description="The longest random wait between seeing renewed TLS files and "
        "draining, so the replicas of one service, which share one certificate, do not all "
        "restart at once.")
    mesh_token: SecretStr = Field(
        SecretStr(""), description="Plaintext development only (with TLS, certificates say "
        "who calls): a shared secret every mesh service sends on its calls to the others "
        "(x-infermesh-mesh-token), which then admits service-only methods only with it. "
        "Empty: internal calls are not authenticated (the services log a warning).")


class BlobCacheSettings(BaseSettings):
    """Where a process that fetches model files from the registry (a replica's sidecar, a
    gateway's tokenizers) keeps them, verified, and how many bytes it may keep."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", extra="ignore")

    blob_cache_dir: pathlib.Path = Field(
        pathlib.Path(".infermesh/data/blob-cache"),
        description="This process's cache of registry blobs (content-addressed, verified).")
    blob_cache_max_bytes: int = Field(
        20 << 30, gt=0, description="Bytes the blob cache may hold; least recently used blobs "
        "that no loaded version pins are evicted to make room, and a version that cannot fit "
        "is refused (a placement error naming this setting).")
