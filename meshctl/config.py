"""Where meshctl finds a service (the gateway, the registry) and its key: flags, then INFERMESH_* variables, then the
local stack's `.infermesh/stack.json`."""

from __future__ import annotations

import os
import pathlib

import typer

from deploy.local.state import load_state

DEFAULT_STATE_DIR = pathlib.Path(os.environ.get("INFERMESH_STATE_DIR", ".infermesh"))


def endpoint_and_key(
    service: str, endpoint: str | None, api_key: str | None
) -> tuple[str, str]:
    """`service`'s host:port (`--<service>`, `INFERMESH_<SERVICE>`, the local stack) and the
    API key (`--api-key`, `INFERMESH_API_KEY`, the local stack's admin key)."""
    state = load_state(DEFAULT_STATE_DIR)
    endpoint = service_endpoint(service, endpoint)
    api_key = api_key or os.environ.get("INFERMESH_API_KEY") or (state.api_key if state else None)
    if not api_key:
        raise typer.BadParameter("no API key: pass --api-key or set INFERMESH_API_KEY")
    return endpoint, api_key


def service_endpoint(service: str, endpoint: str | None) -> str:
    """`service`'s host:port: `--<service>`, `INFERMESH_<SERVICE>`, or the local stack's."""
    variable = f"INFERMESH_{service.upper()}"
    endpoint = endpoint or os.environ.get(variable)
    if not endpoint:
        state = load_state(DEFAULT_STATE_DIR)
        endpoint = state.endpoints.get(service) if state else None
    if not endpoint:
        raise typer.BadParameter(f"no {service}: pass --{service} or set {variable}")
    return endpoint


def gateway_and_key(gateway: str | None, api_key: str | None) -> tuple[str, str]:
    return endpoint_and_key("gateway", gateway, api_key)
