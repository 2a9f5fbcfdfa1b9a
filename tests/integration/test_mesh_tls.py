"""Mutual TLS and the caller table, against real services started as a deployment runs them:
each with its own certificate from a fresh CA, over a real etcd. A caller without a
certificate, with another CA's, or with the wrong service's is refused; the right service is
admitted; an auditor event must name its own caller."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import InferenceServerException
from tritonclient.grpc import aio as triton_aio

from backends.triton.adapter import EngineRequest, TritonAdapter, triton_client
from backends.triton.control import CONTROL_HEADER, control_headers, read_token, write_token
from backends.triton.launcher import TritonPorts, TritonServer, TritonStartError
from deploy.local.certificates import make_mesh_certificates
from deploy.local.etcd_server import EtcdServer
from deploy.local.stack import service_process, wait_serving
from deploy.local.state import files_for
from infermesh.v1 import (
    auditor_pb2,
    ratelimit_pb2,
    ratelimit_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.auditor.client import append
from services.common import etcd, tls
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess
from tests.integration.auditors import audit_event

pytestmark = pytest.mark.integration

SERVICES = ("ratelimit", "scheduler", "auditor", "registry")


@dataclass
class TlsMesh:
    tls_dir: pathlib.Path
    endpoints: dict[str, str]
    metrics: dict[str, str]
    etcd: str

    def identity(self, kind: str) -> tls.MeshTls:
        files = files_for(self.tls_dir, kind)
        loaded = tls.MeshTls.load(tls.TlsSettings(mode=tls.TlsMode.MUTUAL, ca_file=files.ca,
                                                  cert_file=files.cert, key_file=files.key))
        assert loaded is not None
        return loaded

    def channel(self, service: str, as_kind: str) -> grpc.aio.Channel:
        return tls.channel(self.endpoints[service], service, self.identity(as_kind))

    def refusals(self, service: str, method: str, reason: str) -> float:
        with urllib.request.urlopen(f"http://{self.metrics[service]}/metrics", timeout=5) as r:
            text = r.read().decode()
        prefix = (f'infermesh_grpc_server_refused_total{{method="{method}",'
                  f'reason="{reason}"}} ')
        return sum(float(line[len(prefix):]) for line in text.splitlines()
                   if line.startswith(prefix))


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory) -> AsyncIterator[TlsMesh]:
    root = tmp_path_factory.mktemp("mesh-tls")
    make_mesh_certificates(root / "tls")
    etcd_server = EtcdServer(root / "etcd", root / "etcd.log",
                             certificates=files_for(root / "tls", "etcd"))
    etcd_server.start()
    children: list[ChildProcess] = [etcd_server.process]
    endpoints, metrics = {}, {}
    extra = {"auditor": {"INFERMESH_AUDITOR_DATA_DIR": str(root / "audit")},
             "registry": {"INFERMESH_REGISTRY_BLOB_DIR": str(root / "blobs"),
                          "INFERMESH_REGISTRY_AUTO_ROLLBACK": "false"}}
    try:
        for kind in SERVICES:
            port, metrics_port = free_port(), free_port()
            child = service_process(
                f"{kind}-tls-{uuid.uuid4().hex[:6]}", f"services.{kind}",
                root / f"{kind}.log", port,
                {"INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
                 "INFERMESH_METRICS_PORT": str(metrics_port),
                 **files_for(root / "tls", kind).env(), **extra.get(kind, {})})
            child.start()
            children.append(child)
            endpoints[kind] = f"{LOOPBACK}:{port}"
            metrics[kind] = f"{LOOPBACK}:{metrics_port}"
        mesh = TlsMesh(root / "tls", endpoints, metrics, etcd_server.endpoint)
        deadline = time.monotonic() + 60
        for kind, child in zip(SERVICES, children[1:], strict=True):
            await asyncio.to_thread(wait_serving, child, endpoints[kind], deadline,
                                    mesh.identity(tls.OPERATOR), kind)
        yield mesh
    finally:
        for child in children:
            child.stop()


# One call per internal method that only services may make, with its stub and an empty request.
INTERNAL_CALLS = {
    ("ratelimit", "/infermesh.v1.RateLimit/Lease"):
        lambda ch: ratelimit_pb2_grpc.RateLimitStub(ch).Lease(ratelimit_pb2.LeaseRequest(),
                                                             timeout=5),
    ("scheduler", "/infermesh.v1.Scheduler/Route"):
        lambda ch: scheduler_pb2_grpc.SchedulerStub(ch).Route(scheduler_pb2.RouteRequest(),
                                                             timeout=5),
    ("scheduler", "/infermesh.v1.Scheduler/Release"):
        lambda ch: scheduler_pb2_grpc.SchedulerStub(ch).Release(
            scheduler_pb2.ReleaseRouteRequest(), timeout=5),
    ("scheduler", "/infermesh.v1.Scheduler/RouteStream"):
        lambda ch: _first(scheduler_pb2_grpc.SchedulerStub(ch).RouteStream(
            iter([scheduler_pb2.RouteStreamRequest()]), timeout=5)),
    ("auditor", "/infermesh.v1.Auditor/Append"):
        lambda ch: append(ch, [audit_event(1, source="gateway/x")], 5.0),
}


async def _first(call) -> None:
    async for _ in call:
        return


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_without_a_certificate_nothing_gets_through(mesh: TlsMesh):
    """Plaintext, TLS without a client certificate, and a certificate from another CA all end
    in the handshake: the client sees UNAVAILABLE and no handler ever runs."""
    stranger = make_mesh_certificates(mesh.tls_dir.parent / "stranger-ca", ("gateway",))
    impostor = tls.MeshTls.load(tls.TlsSettings(
        mode=tls.TlsMode.MUTUAL, ca_file=files_for(mesh.tls_dir, "gateway").ca,
        cert_file=stranger["gateway"].cert, key_file=stranger["gateway"].key))
    no_certificate = tls.MeshTls(ca=mesh.identity("gateway").ca)
    for (service, _method), call in INTERNAL_CALLS.items():
        endpoint = mesh.endpoints[service]
        for name, channel in (
            ("plaintext", grpc.aio.insecure_channel(endpoint)),
            ("no client certificate", tls.channel(endpoint, service, no_certificate)),
            ("another CA's certificate", tls.channel(endpoint, service, impostor)),
        ):
            async with channel:
                assert await _code(call(channel)) == grpc.StatusCode.UNAVAILABLE, (service, name)


async def test_the_wrong_service_is_refused_and_counted(mesh: TlsMesh):
    for (service, method), call in INTERNAL_CALLS.items():
        before = mesh.refusals(service, method, "wrong_service")
        for wrong in ("sidecar", tls.OPERATOR):
            async with mesh.channel(service, wrong) as channel:
                assert await _code(call(channel)) == grpc.StatusCode.PERMISSION_DENIED, \
                    (service, wrong)
        assert mesh.refusals(service, method, "wrong_service") == before + 2


async def test_the_right_service_reaches_the_handler(mesh: TlsMesh):
    """Admitted calls get the handler's own answer (an empty request is invalid, or routed
    nowhere), never an authentication refusal."""
    refusals = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAVAILABLE}
    for (service, _method), call in INTERNAL_CALLS.items():
        if service == "auditor":
            continue  # below, with the source check
        async with mesh.channel(service, "gateway") as channel:
            assert await _code(call(channel)) not in refusals, service


async def test_an_audit_event_names_its_own_caller(mesh: TlsMesh):
    run = uuid.uuid4().hex[:8]

    def event(n: int, source: str) -> auditor_pb2.AuditEvent:
        return audit_event(n, source=source, event_id=f"tls-{run}-{n}", request_id=f"r-{n}")

    async with mesh.channel("auditor", "gateway") as channel:
        assert (await append(channel, [event(1, "gateway/g-1")], 5.0)).appended == 1
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await append(channel, [event(2, "gateway/g-1"), event(3, "registry/r-1")], 5.0)
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "events[1].source" in forged.value.details()
    async with mesh.channel("auditor", "registry") as channel:
        assert (await append(channel, [event(4, "registry/r-1")], 5.0)).appended == 1


async def test_model_files_need_a_replica_or_an_admin_key(mesh: TlsMesh):
    """A sidecar reads blobs on its certificate; an operator's certificate alone is not
    enough (the call then needs an admin key); a service with no business there is refused."""
    request = registry_pb2.DownloadBlobRequest(digest="sha256:" + "0" * 64)

    async def download(as_kind: str) -> grpc.StatusCode:
        async with mesh.channel("registry", as_kind) as channel:
            stream = registry_pb2_grpc.RegistryStub(channel).DownloadBlob(request, timeout=5)
            return await _code(stream.read())

    assert await download("sidecar") == grpc.StatusCode.NOT_FOUND  # admitted: no such blob
    assert await download(tls.OPERATOR) == grpc.StatusCode.UNAUTHENTICATED  # no key
    assert await download("ratelimit") == grpc.StatusCode.UNAUTHENTICATED


async def test_only_the_gateway_passes_a_check_by_address(mesh: TlsMesh):
    """Clients of the public gateway (the SDK, meshctl, HTTP clients) check the address they
    dialled; no other process's certificate names a loopback address, so none can pose as the
    gateway to them. Dialled by its identity, each answers."""
    for service in SERVICES:
        for peer_kind, expected in ((None, grpc.StatusCode.UNAVAILABLE),
                                    (service, grpc.StatusCode.OK)):
            async with tls.channel(mesh.endpoints[service], peer_kind,
                                   mesh.identity(tls.OPERATOR)) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
                assert await _code(check) == expected, (service, peer_kind)


async def test_plaintext_development_binds_loopback_only():
    server = grpc.aio.server()
    with pytest.raises(ValueError, match="loopback"):
        tls.add_listener(server, "0.0.0.0:0", None)
    assert tls.add_listener(server, f"{LOOPBACK}:0", None) > 0


async def test_triton_takes_only_mesh_certificates(mesh: TlsMesh, tmp_path):
    """Triton's gRPC port with `--grpc-use-ssl-mutual`: a mesh certificate reaches it;
    plaintext, no client certificate or another CA's certificate do not. Model control answers
    only calls with the replica's token (its sidecar's): a gateway's certificate, which must
    reach the port to generate, still generates but cannot list, load or unload models."""
    files = files_for(mesh.tls_dir, "triton")
    write_token(tmp_path / "control-token")
    token = read_token(tmp_path / "control-token")
    server = TritonServer(tmp_path / "triton", TritonPorts.free(), models=["reference"],
                          tls_settings=tls.TlsSettings(mode=tls.TlsMode.MUTUAL,
                                                       ca_file=files.ca, cert_file=files.cert,
                                                       key_file=files.key),
                          control_token=token)
    server.start()
    adapter = TritonAdapter(mesh.identity("gateway"))
    try:
        await asyncio.to_thread(server.wait_ready, 60.0)
        async with triton_client(server.grpc_address, mesh.identity("sidecar")) as sidecar:
            assert await sidecar.is_server_ready()
            control = control_headers(token)
            index = await sidecar.get_model_repository_index(headers=control, as_json=True,
                                                             client_timeout=5)
            assert "reference" in {m["name"] for m in index["models"]}
            await sidecar.load_model("reference", headers=control, client_timeout=30)
        async with triton_client(server.grpc_address, mesh.identity("gateway")) as gateway:
            for name, call in (
                ("index", lambda: gateway.get_model_repository_index(client_timeout=5)),
                ("load", lambda: gateway.load_model("reference", client_timeout=5)),
                ("unload", lambda: gateway.unload_model("reference", client_timeout=5)),
                ("config", lambda: gateway.get_model_config("reference", client_timeout=5)),
                ("wrong token", lambda: gateway.load_model(
                    "reference", headers=control_headers(token[:-1]), client_timeout=5)),
                ("the key Triton was given", lambda: gateway.load_model(
                    "reference", headers={CONTROL_HEADER: token}, client_timeout=5)),
            ):
                with pytest.raises(InferenceServerException) as refused:
                    await call()
                assert "restricted" in str(refused.value), (name, refused.value)
            assert await gateway.is_model_ready("reference", client_timeout=5)  # not unloaded
        chunks = [chunk async for chunk in adapter.generate(server.grpc_address, EngineRequest(
            triton_model_name="reference", request_id="tls-1", prompt="hello", max_tokens=3))]
        assert chunks[-1].final and chunks[-1].completion_tokens > 0
        stranger = make_mesh_certificates(tmp_path / "stranger-ca", ("sidecar",))["sidecar"]
        for client in (
            triton_aio.InferenceServerClient(server.grpc_address),
            triton_client(server.grpc_address, tls.MeshTls(ca=mesh.identity("sidecar").ca)),
            triton_client(server.grpc_address, tls.MeshTls(
                ca=mesh.identity("sidecar").ca, cert=stranger.cert.read_bytes(),
                key=stranger.key.read_bytes())),
        ):
            async with client:
                with pytest.raises(InferenceServerException):
                    await client.is_server_ready(client_timeout=5)
    finally:
        await adapter.close()
        assert await asyncio.to_thread(server.stop) == 0, server.log_tail()
    assert token not in (tmp_path / "triton" / "tritonserver.log").read_text()


async def test_triton_will_not_start_mutual_without_a_control_token(mesh: TlsMesh, tmp_path):
    files = files_for(mesh.tls_dir, "triton")
    server = TritonServer(tmp_path / "triton", TritonPorts.free(), models=[],
                          tls_settings=tls.TlsSettings(mode=tls.TlsMode.MUTUAL,
                                                       ca_file=files.ca, cert_file=files.cert,
                                                       key_file=files.key))
    with pytest.raises(TritonStartError, match="control token"):
        server.argv()


async def test_etcd_takes_only_mesh_certificates(mesh: TlsMesh):
    """etcd with `--client-cert-auth`: the services above run on it; a mesh certificate reads
    and writes, a client without one (plaintext, or TLS without a certificate) gets nothing,
    nor does one with Triton's certificate (serving only: the engine code inside Triton holds
    its key)."""
    key = f"/infermesh/v1/test/tls-{uuid.uuid4().hex[:6]}".encode()
    async with etcd.connect(mesh.etcd, 5.0, mesh.identity(tls.OPERATOR)) as client:
        await client.put(key, b"mesh")
        assert (await client.get(key)).value == b"mesh"
    for stranger in (None, tls.MeshTls(ca=mesh.identity(tls.OPERATOR).ca),
                     mesh.identity("triton")):
        async with etcd.connect(mesh.etcd, 2.0, stranger) as client:
            with pytest.raises((aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)):
                await client.get(key)


# Bytes no protobuf parser takes: a field tag with an unterminated varint, and a length-delimited
# field that claims more bytes than follow.
MALFORMED_FRAMES = (b"\xff\xff\xff", b"\x0a\x05ab")
SERVICE_NAMES = {"ratelimit": ("RateLimit", ratelimit_pb2),
                 "scheduler": ("Scheduler", scheduler_pb2),
                 "auditor": ("Auditor", auditor_pb2), "registry": ("Registry", registry_pb2)}


async def test_a_malformed_frame_is_invalid_argument_at_every_internal_method(mesh: TlsMesh):
    """grpcio answers a frame it cannot parse UNKNOWN; every internal method answers it
    INVALID_ARGUMENT instead (a caller the caller table admits reaches the parse; the others are
    refused before it), never UNKNOWN or INTERNAL."""
    callers = ("gateway", "registry", "sidecar", "scheduler", tls.OPERATOR)
    reached: set[str] = set()
    for service, (name, module) in SERVICE_NAMES.items():
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            path = f"/{module.DESCRIPTOR.package}.{name}/{method.name}"
            for caller in callers:
                async with mesh.channel(service, caller) as channel:
                    for frame in MALFORMED_FRAMES:
                        if method.client_streaming:
                            call = channel.stream_stream(path)(iter([frame]), timeout=5)
                        else:
                            call = channel.unary_stream(path)(frame, timeout=5)
                        code = await _code(_first(call))
                        assert code in (grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.PERMISSION_DENIED,
                                        grpc.StatusCode.UNAUTHENTICATED), (path, caller, code)
                        if code is grpc.StatusCode.INVALID_ARGUMENT:
                            reached.add(path)
    every = {f"/infermesh.v1.{name}/{m.name}" for name, module in SERVICE_NAMES.values()
             for m in module.DESCRIPTOR.services_by_name[name].methods}
    assert reached == every  # each method's parse was reached by some admitted caller


def _probe(mesh: TlsMesh, kind: str, service: str) -> subprocess.CompletedProcess[str]:
    """The Kubernetes exec probe, run as the container `kind` would run it against `service`."""
    port = mesh.endpoints[service].rsplit(":", 1)[1]
    return subprocess.run(
        [sys.executable, "-m", "services.common.probe", service, "--port", port],
        env={**os.environ, **files_for(mesh.tls_dir, kind).env()},
        capture_output=True, text=True, timeout=30, check=False)


async def test_the_exec_probe_checks_health_with_the_containers_own_identity(mesh: TlsMesh):
    for service in SERVICES:
        probed = await asyncio.to_thread(_probe, mesh, service, service)
        assert probed.returncode == 0, (service, probed.stderr)
    # A server that is not the kind the probe expects fails it (its certificate says so).
    port = mesh.endpoints["ratelimit"].rsplit(":", 1)[1]
    mismatched = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.common.probe", "scheduler", "--port", port],
        env={**os.environ, **files_for(mesh.tls_dir, "scheduler").env()},
        capture_output=True, text=True, timeout=30, check=False)
    assert mismatched.returncode == 1 and "UNAVAILABLE" in mismatched.stderr, mismatched.stderr
