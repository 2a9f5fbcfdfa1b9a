"""Shared fixtures: real servers started by the test session on free loopback ports."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from deploy.local.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the whole session; tests keep apart by key prefix or fresh names."""
    root: pathlib.Path = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(root / "data", root / "etcd.log")
    server.start()
    yield server
    server.stop()
