"""deploy/k8s's etcd, run: the real etcd binary started with the command the rendered manifest
gives its container (addresses moved to loopback ports, files to a fresh CA's), reached as a
mesh service reaches it. A client with a mesh certificate writes and reads; one without a
certificate, or in plaintext, is refused; the probes' paths answer on the metrics listener."""

from __future__ import annotations

import pathlib
import time
import urllib.request
from collections.abc import Iterator

import aetcd
import pytest

from deploy.local.certificates import make_mesh_certificates
from deploy.local.etcd_server import ETCD_BINARY
from deploy.local.state import CertificateFiles, files_for
from services.common import etcd, tls
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess
from tests.unit.test_k8s_manifests import K8S, render

pytestmark = pytest.mark.integration


def _etcd_container() -> dict:
    statefulset = next(d for d in render(K8S / "base")
                       if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd")
    return statefulset["spec"]["template"]["spec"]["containers"][0]


def _loopback_argv(command: list[str], files: CertificateFiles, data_dir: pathlib.Path,
                   ports: dict[str, int]) -> list[str]:
    """The manifest's etcd command with its addresses, data directory and certificate files
    replaced; every other flag as the manifest has it."""
    client, peer = f"127.0.0.1:{ports['client']}", f"127.0.0.1:{ports['peer']}"
    by_file = {"ca.crt": files.ca, "tls.crt": files.cert, "tls.key": files.key}
    argv = [str(ETCD_BINARY)]
    for argument in command[1:]:
        name, _, value = argument.removeprefix("--").partition("=")
        if name in ("listen-client-urls", "advertise-client-urls"):
            assert value.startswith("https://"), argument
            value = f"https://{client}"
        elif name in ("listen-peer-urls", "initial-advertise-peer-urls"):
            assert value.startswith("https://"), argument
            value = f"https://{peer}"
        elif name == "initial-cluster":
            value = f"k8s=https://{peer}"
        elif name == "name":
            value = "k8s"
        elif name == "data-dir":
            value = str(data_dir)
        elif name == "listen-metrics-urls":
            value = f"http://127.0.0.1:{ports['metrics']}"
        elif name.endswith("-file"):
            value = str(by_file[pathlib.PurePath(value).name])
        argv.append(f"--{name}={value}")
    return argv


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status


@pytest.fixture(scope="module")
def manifest_etcd(tmp_path_factory) -> Iterator[tuple[str, pathlib.Path, dict]]:
    root = tmp_path_factory.mktemp("k8s-etcd")
    certificates = make_mesh_certificates(root / "tls", kinds=("etcd", "gateway"))
    container = _etcd_container()
    ports = {"client": free_port(), "peer": free_port(), "metrics": free_port()}
    process = ChildProcess("etcd", _loopback_argv(container["command"], certificates["etcd"],
                                                  root / "data", ports), root / "etcd.log")
    process.start()
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["port"] == 2381  # the metrics listener, not the client port
    ready = f"http://127.0.0.1:{ports['metrics']}{readiness['path']}"
    deadline = time.monotonic() + 15
    while True:
        assert process.alive(), process.log_tail()
        try:
            if _get(ready) == 200:
                break
        except OSError:
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
    try:
        yield f"{LOOPBACK}:{ports['client']}", root, {
            "liveness": f"http://127.0.0.1:{ports['metrics']}"
                        f"{container['livenessProbe']['httpGet']['path']}",
            "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics"}
    finally:
        process.stop(grace_s=5.0)


def _identity(root: pathlib.Path, kind: str | None) -> tls.MeshTls:
    """A mesh service's TLS material, or (None) the CA alone: no client certificate."""
    files = files_for(root / "tls", kind or "gateway")
    loaded = tls.MeshTls.load(tls.TlsSettings(
        mode=tls.TlsMode.MUTUAL, ca_file=files.ca, cert_file=files.cert if kind else None,
        key_file=files.key if kind else None), need_certificate=kind is not None)
    assert loaded is not None
    return loaded


async def test_a_mesh_certificate_reads_and_writes(manifest_etcd):
    endpoint, root, _ = manifest_etcd
    async with etcd.connect(endpoint, 5.0, _identity(root, "gateway")) as client:
        await client.put(b"/infermesh/v1/k8s-check", b"1")
        got = await client.get(b"/infermesh/v1/k8s-check")
    assert got is not None and got.value == b"1"


@pytest.mark.parametrize("how", ["no client certificate", "plaintext"])
async def test_without_a_certificate_etcd_refuses(manifest_etcd, how):
    endpoint, root, _ = manifest_etcd
    client = (etcd.connect(endpoint, 2.0, _identity(root, None)) if how != "plaintext"
              else etcd.connect(endpoint, 2.0))
    with pytest.raises(aetcd.exceptions.ClientError):  # the handshake fails: no call reaches it
        async with client:
            await client.get(b"/infermesh/v1/k8s-check")


def test_probes_and_metrics_answer_on_the_plain_listener(manifest_etcd):
    _, _, urls = manifest_etcd
    assert _get(urls["liveness"]) == 200
    assert _get(urls["metrics"]) == 200
