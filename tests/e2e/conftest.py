"""The whole embedded stack (real etcd, real Triton, every service), once per test session."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from deploy.local.stack import Stack, StackInfo, StackOptions


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack(stack_dir: pathlib.Path) -> Iterator[StackInfo]:
    running = Stack(StackOptions(state_dir=stack_dir))
    info = running.up()
    yield info
    failed = running.failed_children()
    running.down()
    assert not failed, f"processes died during the tests: {failed} (logs in {stack_dir}/logs)"


@pytest.fixture(autouse=True)
def stack_client_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                             ) -> None:
    """A test of the stack runs as a user who sourced its env file: meshctl and the SDK trust
    its CA (and present the operator's certificate) by `INFERMESH_TLS_*_FILE`, and HTTP
    clients that read the system's trust store (openai, httpx, requests) find the CA by
    `SSL_CERT_FILE`/`REQUESTS_CA_BUNDLE`."""
    if "stack" not in request.fixturenames:
        return
    info: StackInfo = request.getfixturevalue("stack")
    for name, value in info.client_env().items():
        monkeypatch.setenv(name, value)
    if info.tls_dir:
        monkeypatch.setenv("SSL_CERT_FILE", info.client_env()["INFERMESH_TLS_CA_FILE"])
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", info.client_env()["INFERMESH_TLS_CA_FILE"])
