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
