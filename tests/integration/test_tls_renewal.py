"""A service restarts on renewed certificates: it reads its TLS files again, drains and stops
once they change (its supervisor — kubelet, the stack's — starts it on the new ones), and says
when its certificate expires."""

from __future__ import annotations

import shutil
import time
import urllib.request
import uuid

import pytest

from deploy.local.certificates import make_mesh_certificates
from deploy.local.etcd_server import EtcdServer
from deploy.local.stack import service_process, wait_serving
from deploy.local.state import files_for
from services.common import tls
from services.common.net import LOOPBACK, free_port

pytestmark = pytest.mark.integration


def test_renewed_certificates_drain_and_stop_the_process(tmp_path):
    make_mesh_certificates(tmp_path / "tls")
    etcd_server = EtcdServer(tmp_path / "etcd", tmp_path / "etcd.log",
                             certificates=files_for(tmp_path / "tls", "etcd"))
    etcd_server.start()
    mounted = tmp_path / "mounted"  # what the process reads, as a Secret volume would be
    shutil.copytree(tmp_path / "tls", mounted)
    port, metrics_port = free_port(), free_port()
    ratelimit = service_process(
        f"ratelimit-renewal-{uuid.uuid4().hex[:6]}", "services.ratelimit",
        tmp_path / "ratelimit.log", port,
        {"INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
         "INFERMESH_METRICS_PORT": str(metrics_port),
         "INFERMESH_TLS_RENEWAL_CHECK_S": "0.2", "INFERMESH_TLS_RENEWAL_SPREAD_S": "0",
         **files_for(mounted, "ratelimit").env()})
    try:
        ratelimit.start()
        operator = files_for(tmp_path / "tls", tls.OPERATOR)
        wait_serving(ratelimit, f"{LOOPBACK}:{port}", time.monotonic() + 60,
                     tls.MeshTls(operator.ca.read_bytes(), operator.cert.read_bytes(),
                                 operator.key.read_bytes()), "ratelimit")
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics",
                                    timeout=5) as reply:
            metrics = reply.read().decode()
        [expiry] = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("infermesh_tls_certificate_expiry_timestamp_seconds ")]
        assert expiry == tls.certificate_expiry(
            files_for(mounted, "ratelimit").cert.read_bytes())
        time.sleep(1.0)  # unchanged files: it keeps serving
        assert ratelimit.process is not None and ratelimit.process.poll() is None

        renewed = make_mesh_certificates(tmp_path / "renewed", ("ratelimit",))
        shutil.copy(renewed["ratelimit"].cert, files_for(mounted, "ratelimit").cert)
        shutil.copy(renewed["ratelimit"].key, files_for(mounted, "ratelimit").key)
        assert ratelimit.process.wait(timeout=30) == 0  # drained and stopped by itself
        assert "tls_renewed" in (tmp_path / "ratelimit.log").read_text()
    finally:
        ratelimit.stop()
        etcd_server.process.stop()
