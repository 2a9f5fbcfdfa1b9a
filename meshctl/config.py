"""Where meshctl finds the gateway and its key: flags, then INFERMESH_* variables, then the
local stack's `.infermesh/stack.json`."""

from __future__ import annotations

import os
import pathlib

import typer

from deploy.local.stack import load_state

DEFAULT_STATE_DIR = pathlib.Path(os.environ.get("INFERMESH_STATE_DIR", ".infermesh"))


def gateway_and_key(gateway: str | None, api_key: str | None) -> tuple[str, str]:
    state = load_state(DEFAULT_STATE_DIR)
    gateway = gateway or os.environ.get("INFERMESH_GATEWAY") or (state.gateway if state else None)
    api_key = api_key or os.environ.get("INFERMESH_API_KEY") or (state.api_key if state else None)
    if not gateway:
        raise typer.BadParameter("no gateway: pass --gateway or set INFERMESH_GATEWAY")
    if not api_key:
        raise typer.BadParameter("no API key: pass --api-key or set INFERMESH_API_KEY")
    return gateway, api_key
