"""Shared fixtures: real servers started by the test session on free loopback ports."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from deploy.local.etcd_server import EtcdServer

# Single services the tests start (and their in-process settings) run in the explicit
# development mode; the embedded stack sets its own mode for its children (TLS).
os.environ.setdefault("INFERMESH_TLS_MODE", "plaintext-development")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the whole session; tests keep apart by key prefix or fresh names."""
    root: pathlib.Path = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(root / "data", root / "etcd.log")
    server.start()
    yield server
    server.stop()
