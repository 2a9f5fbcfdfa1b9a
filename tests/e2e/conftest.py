"""The whole embedded stack (real etcd, real Triton, every service), once per test session."""

from __future__ import annotations

import os
import pathlib
import ssl
from collections.abc import Iterator

import pytest

from deploy.local.stack import Stack, StackInfo, StackOptions


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack(stack_dir: pathlib.Path) -> Iterator[StackInfo]:
    # Traces on, sampling only generations whose client sent a sampled `traceparent` (an
    # operator's setting: a gateway ignores the client's flag by default): the tracing tests'
    # (test_tracing.py); the rest of the suite makes no span.
    running = Stack(StackOptions(state_dir=stack_dir, traces_dir=stack_dir / "traces",
                                 trace_sample_ratio=0.0, honour_client_sampled=True))
    info = running.up()
    yield info
    failed = running.failed_children()
    running.down()
    assert not failed, f"processes died during the tests: {failed} (logs in {stack_dir}/logs)"


@pytest.fixture(scope="session")
def trust_bundle(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The machine's trusted roots (pip's registry among them) plus the stack's CA, in one
    PEM file."""
    system = pathlib.Path(os.environ.get("SSL_CERT_FILE")
                          or ssl.get_default_verify_paths().cafile or "/nonexistent")
    ca = pathlib.Path(stack.client_env()["INFERMESH_TLS_CA_FILE"])
    bundle = tmp_path_factory.mktemp("trust") / "roots.pem"
    bundle.write_bytes((system.read_bytes() if system.is_file() else b"") + ca.read_bytes())
    return bundle


@pytest.fixture(autouse=True)
def stack_client_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                             ) -> None:
    """A test of the stack runs as a user who sourced its env file: meshctl and the SDK trust
    its CA by `INFERMESH_TLS_CA_FILE`, and HTTP clients that read the trust store from
    `SSL_CERT_FILE`/`REQUESTS_CA_BUNDLE` (openai, httpx, requests) find it there beside the
    machine's own roots. A test marked `operator` runs as an admin who sourced `operator-env`:
    meshctl and the SDK also present the operator's certificate (`INFERMESH_TLS_CERT_FILE`/
    `_KEY_FILE`), which the internal services and etcd ask for."""
    if "stack" not in request.fixturenames:
        return
    info: StackInfo = request.getfixturevalue("stack")
    operator = request.node.get_closest_marker("operator") is not None
    for name, value in (info.operator_env() if operator else info.client_env()).items():
        monkeypatch.setenv(name, value)
    if info.tls_dir:
        bundle = str(request.getfixturevalue("trust_bundle"))
        monkeypatch.setenv("SSL_CERT_FILE", bundle)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", bundle)
