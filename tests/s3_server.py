"""A real S3 API for the tests: moto's standalone server on a free loopback port, stopped by pid.

Import the `s3_server` fixture into a test module to use it; each test makes its own bucket.
"""

from __future__ import annotations

import pathlib
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

MOTO_SERVER = pathlib.Path(sys.executable).parent / "moto_server"
# moto accepts any credentials; the standard variables are how the registry gets real ones.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "infermesh-test", "AWS_SECRET_ACCESS_KEY": "infermesh-test",
               "AWS_REGION": "us-east-1"}


class MotoServer:
    def __init__(self, log_path: pathlib.Path):
        self.port = free_port()
        self.process = ChildProcess(
            "moto", [str(MOTO_SERVER), "-H", LOOPBACK, "-p", str(self.port)], log_path)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"moto_server exited:\n{self.process.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto_server not up after {timeout_s}s:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop(grace_s=5.0)

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=CREDENTIALS["AWS_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        name = f"infermesh-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()
