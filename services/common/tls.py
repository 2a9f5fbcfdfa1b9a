"""Transport security for every listener and channel of the mesh: mutual TLS between services,
server-authenticated TLS on the public gateway, each service's identity in its certificate.

A service's identity is the DNS name `<kind>.infermesh` among its certificate's subject
alternative names (`gateway.infermesh`, `registry.infermesh`, `operator.infermesh` for an admin's
meshctl). A client dialling a mesh service checks the server presents the kind it meant to
reach; a server reads the caller's kind from the handshake (`caller_kind`) and `callers.py`
decides what that kind may call. Plaintext exists only as `INFERMESH_TLS_MODE=
plaintext-development`, which refuses to listen anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MESH_DOMAIN = "infermesh"
OPERATOR = "operator"  # an admin's meshctl: may call the internal admin reads, with a key


class TlsMode(enum.StrEnum):
    MUTUAL = "mutual"
    PLAINTEXT_DEVELOPMENT = "plaintext-development"


class TlsSettings(BaseSettings):
    """`INFERMESH_TLS_*`: one CA bundle, this process's certificate and key, and the mode."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_TLS_", extra="ignore")

    mode: TlsMode = Field(
        TlsMode.MUTUAL, description="mutual (every deployment): TLS on every listener and "
        "channel, client certificates between services. plaintext-development: no TLS, "
        "loopback listeners only, for single processes on a developer's machine.")
    ca_file: pathlib.Path | None = Field(
        None, description="PEM bundle of the CA(s) that sign the mesh's certificates.")
    cert_file: pathlib.Path | None = Field(
        None, description="PEM certificate (chain) of this process; its SAN DNS name "
        "`<kind>.infermesh` is its identity.")
    key_file: pathlib.Path | None = Field(None, description="PEM private key of `cert_file`.")


def identity(kind: str) -> str:
    """The DNS name a `kind`'s certificate carries: `gateway` → `gateway.infermesh`."""
    return f"{kind}.{MESH_DOMAIN}"


@dataclass(frozen=True)
class MeshTls:
    """Loaded TLS material. A client may hold the CA alone (public calls, no client
    certificate); a server holds all three."""

    ca: bytes | None  # None: the system's roots (a client of a public endpoint)
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def load(cls, settings: TlsSettings, need_certificate: bool = True) -> MeshTls | None:
        """The files named by `settings` (None in plaintext development); errors name the
        setting that is missing or unreadable."""
        if settings.mode is TlsMode.PLAINTEXT_DEVELOPMENT:
            return None
        names = {"ca_file": settings.ca_file, "cert_file": settings.cert_file,
                 "key_file": settings.key_file}
        needed = names if need_certificate else {"ca_file": settings.ca_file}
        missing = [f"INFERMESH_TLS_{name.upper()}" for name, path in needed.items() if path is None]
        if missing:
            raise ValueError(
                f"TLS mode is mutual but {', '.join(missing)} is not set (set it, or "
                f"INFERMESH_TLS_MODE={TlsMode.PLAINTEXT_DEVELOPMENT} on a development machine)")
        read = {}
        for name, path in names.items():
            if path is None:
                read[name] = None
                continue
            try:
                read[name] = path.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"INFERMESH_TLS_{name.upper()}: cannot read {path}: {exc}") from None
        if (read["cert_file"] is None) != (read["key_file"] is None):
            raise ValueError("INFERMESH_TLS_CERT_FILE and INFERMESH_TLS_KEY_FILE go together")
        return cls(read["ca_file"], read["cert_file"], read["key_file"])

    def server_credentials(self, require_client_certificate: bool) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("a TLS listener needs INFERMESH_TLS_CERT_FILE and _KEY_FILE")
        if require_client_certificate and self.ca is None:
            raise ValueError("checking client certificates needs INFERMESH_TLS_CA_FILE")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca,
            require_client_auth=require_client_certificate)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def peer_options(self, peer_kind: str) -> tuple[tuple[str, Any], ...]:
        """Channel options that make the server prove it is `peer_kind` (`channel_options`)."""
        return channel_options(peer_kind, self)


def certificate_expiry(cert: bytes) -> float:
    """When the first certificate of a PEM chain expires, as Unix time."""
    return x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()


async def wait_for_renewal(settings: TlsSettings, loaded: MeshTls, check_every_s: float) -> None:
    """Returns once the files `settings` names hold other material than `loaded` — cert-manager
    renewed the certificate (or the CA bundle changed) — so the process can restart on it: a
    running gRPC server and its channels keep the material they were made with. A file caught
    missing or half-written mid-rotation is read again at the next check."""
    while True:
        await asyncio.sleep(check_every_s)
        try:
            current = await asyncio.to_thread(MeshTls.load, settings)
        except ValueError:
            continue
        if current != loaded:
            return


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_listener(server: grpc.aio.Server, address: str, tls: MeshTls | None,
                 require_client_certificate: bool = True) -> int:
    """Binds `address` (host:port) with TLS, or in plaintext development on loopback only;
    returns the port."""
    if tls is None:
        host = address.rpartition(":")[0]
        if not is_loopback(host):
            raise ValueError(f"plaintext development listens on loopback only, not {host!r}: "
                             "set INFERMESH_TLS_MODE=mutual and the certificate files")
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials(require_client_certificate))


def channel_options(peer_kind: str | None, tls: MeshTls | None) -> tuple[tuple[str, Any], ...]:
    """With a mesh peer, the server must present `<peer_kind>.infermesh` whatever address was
    dialled (pods and loopback ports have no stable names); public peers are checked against
    the address itself."""
    if tls is None or peer_kind is None:
        return ()
    return (("grpc.ssl_target_name_override", identity(peer_kind)),)


def channel(endpoint: str, peer_kind: str | None, tls: MeshTls | None,
            options: Sequence[tuple[str, Any]] = (),
            interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None
            ) -> grpc.aio.Channel:
    """An asyncio channel to `endpoint`: TLS checking the server is `peer_kind` (None: the
    public gateway, checked by its address), or plaintext in development."""
    options = (*options, *channel_options(peer_kind, tls))
    if tls is None:
        return grpc.aio.insecure_channel(endpoint, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(endpoint, tls.channel_credentials(), options=options,
                                   interceptors=interceptors)


def blocking_channel(endpoint: str, peer_kind: str | None, tls: MeshTls | None) -> grpc.Channel:
    """The same as `channel`, for synchronous callers (start-up probes, `meshctl stack status`)."""
    options = channel_options(peer_kind, tls)
    if tls is None:
        return grpc.insecure_channel(endpoint, options=options)
    return grpc.secure_channel(endpoint, tls.channel_credentials(), options=options)


def caller_kind(context: grpc.aio.ServicerContext) -> str | None:
    """The mesh kind in the caller's verified certificate (`gateway` for `gateway.infermesh`),
    None when it presented none or one without exactly one mesh identity."""
    suffix = f".{MESH_DOMAIN}"
    names = {name.decode() for name in context.auth_context().get(
        "x509_subject_alternative_name", ()) if name.endswith(suffix.encode())}
    if len(names) != 1:
        return None
    return names.pop().removesuffix(suffix)
