"""Where the client finds the gateway and its key, in the same order as `meshctl`: arguments,
then `INFERMESH_*` variables, then the local stack's env file.

    target      Client(target=…) → INFERMESH_GATEWAY → the env file's INFERMESH_GATEWAY
    registry    Client(registry_target=…) → INFERMESH_REGISTRY → the env file's (and auditor)
    api_key     Client(api_key=…) → INFERMESH_API_KEY → the env file's INFERMESH_API_KEY
    TLS         Client(tls=…) → INFERMESH_TLS (1/true) → an "https://" target → a CA file
                below → plaintext
    CA file     Client(root_certificates=…) → INFERMESH_TLS_CA_FILE → the env file's
                INFERMESH_TLS_CA_FILE (from the same source as the endpoint: a stack's CA
                is trusted only for that stack's endpoints); none: the system's roots;
                INFERMESH_TLS_CERT_FILE/_KEY_FILE (a client certificate for the registry
                and the auditor) from that same source; a local stack's `env` holds none,
                its `operator-env` the operator's
    env file    INFERMESH_ENV_FILE, else $INFERMESH_STATE_DIR/env, else ./.infermesh/env
                (what `meshctl stack up` writes: `export NAME=value` lines)
"""

from __future__ import annotations

import os
import pathlib
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional


class ConfigurationError(ValueError):
    """No gateway could be found; the message names the argument and the variable."""


@dataclass(frozen=True)
class Endpoint:
    target: str  # host:port
    api_key: Optional[str]
    tls: bool
    ca_file: Optional[str] = None  # PEM roots that verify the server (None: the system's)
    # A client certificate, which the mesh's internal services (registry, auditor) ask for.
    cert_file: Optional[str] = None
    key_file: Optional[str] = None

    def tls_material(
        self, root_certificates: Optional[bytes], private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
    ) -> tuple[Optional[bytes], Optional[bytes], Optional[bytes]]:
        """(roots, private key, certificate chain) for `grpc.ssl_channel_credentials`: the
        explicit roots, else the CA file; the explicit client certificate, else the one that
        came along with the endpoint, if any."""
        def read(path: Optional[str]) -> Optional[bytes]:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        if root_certificates is None:
            root_certificates = read(self.ca_file)
        if certificate_chain is not None and private_key is not None:
            return root_certificates, private_key, certificate_chain
        if self.cert_file is None or self.key_file is None:
            return root_certificates, None, None
        return root_certificates, read(self.key_file), read(self.cert_file)


def env_file_path(environ: Mapping[str, str]) -> pathlib.Path:
    if environ.get("INFERMESH_ENV_FILE"):
        return pathlib.Path(environ["INFERMESH_ENV_FILE"])
    return pathlib.Path(environ.get("INFERMESH_STATE_DIR", ".infermesh")) / "env"


def read_env_file(path: pathlib.Path) -> dict[str, str]:
    """`export NAME=value` (or `NAME=value`) lines, shell-quoted; {} when there is no file."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep:
                values[name] = value
    return values


def resolve(
    target: Optional[str], api_key: Optional[str], tls: Optional[bool],
    environ: Optional[Mapping[str, str]] = None, service: str = "gateway",
) -> Endpoint:
    """`service`'s endpoint (gateway, registry or auditor) and the key to send it."""
    environ = os.environ if environ is None else environ
    variable = f"INFERMESH_{service.upper()}"
    # An endpoint and its key come from one source, so a key is never sent to an endpoint it
    # was not given with: an explicit or environment endpoint never takes the env file's key,
    # and the env file's endpoint (a local stack's) never takes a key from the environment.
    if target or environ.get(variable):
        target = target or environ[variable]
        api_key = api_key or environ.get("INFERMESH_API_KEY") or None
        source: Mapping[str, str] = environ
    else:
        from_file = read_env_file(env_file_path(environ))
        target = from_file.get(variable) or None
        if not target:
            argument = "target" if service == "gateway" else f"{service}_target"
            raise ConfigurationError(
                f"no {service}: pass {argument}='host:port', set {variable}, or point "
                f"INFERMESH_ENV_FILE at a stack's env file (looked in {env_file_path(environ)})")
        api_key = api_key or from_file.get("INFERMESH_API_KEY") or None
        source = from_file
    ca_file, cert_file, key_file = (source.get(f"INFERMESH_TLS_{name}_FILE") or None
                                    for name in ("CA", "CERT", "KEY"))
    if target.startswith(("https://", "http://")):
        scheme, _, target = target.partition("://")
        tls = (scheme == "https") if tls is None else tls
    if tls is None:
        tls = (environ.get("INFERMESH_TLS", "").lower() in ("1", "true", "yes")
               or ca_file is not None)
    return Endpoint(target.rstrip("/"), api_key, tls, ca_file, cert_file, key_file)
