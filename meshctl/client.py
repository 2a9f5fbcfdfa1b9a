"""meshctl calls the API through the Python SDK (`infermesh_client`): the endpoint, the key and
the TLS material as `meshctl.config` resolves them (flags, environment, contexts, the local
stack), no retries (a refusal is reported as it comes, with the server's delay), and a failure
reported the one meshctl way (`meshctl.exits`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from infermesh_client import NO_RETRIES, Client, InfermeshError

from meshctl.config import endpoint_and_key, tls_for
from meshctl.exits import fail_error
from services.common import tls

TIMEOUT_S = 10.0  # each command's deadline, unless it says otherwise
# The SDK's argument naming each service's endpoint.
TARGET_ARGUMENT = {"gateway": "target", "registry": "registry_target",
                   "auditor": "auditor_target"}


def client_options(service: str, endpoint: str, api_key: str, mesh_tls: tls.MeshTls | None,
                   timeout_s: float | None = TIMEOUT_S) -> dict[str, Any]:
    """The SDK client's arguments for `service` at `endpoint`, verified with `mesh_tls` (None:
    plaintext; a CA of None: the system's roots) and presenting its certificate, if any.
    `timeout_s` None: the gateway's default deadline (generations)."""
    options: dict[str, Any] = {TARGET_ARGUMENT[service]: endpoint, "api_key": api_key,
                               "timeout": timeout_s, "retry": NO_RETRIES,
                               "tls": mesh_tls is not None}
    if mesh_tls is not None:
        options.update(root_certificates=mesh_tls.ca, certificate_chain=mesh_tls.cert,
                       private_key=mesh_tls.key)
    return options


def resolved_options(service: str, endpoint: str | None, api_key: str | None,
                     timeout_s: float | None = TIMEOUT_S) -> dict[str, Any]:
    """`client_options` for `service` at the endpoint and with the key that the flags (None:
    not given) resolve to (`meshctl.config`)."""
    target, key = endpoint_and_key(service, endpoint, api_key)
    return client_options(service, target, key, tls_for(service, endpoint), timeout_s)


@contextlib.contextmanager
def mesh_client(service: str, endpoint: str | None, api_key: str | None,
                timeout_s: float = TIMEOUT_S) -> Iterator[Client]:
    """A blocking SDK client of `service` (gateway, registry, auditor) for one command; an SDK
    error raised in the block prints `error: CODE: message` and exits with its code."""
    client = Client(**resolved_options(service, endpoint, api_key, timeout_s))
    try:
        yield client
    except InfermeshError as exc:
        fail_error(exc)
    finally:
        client.close()
