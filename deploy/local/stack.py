"""The embedded stack: etcd, Triton with the torch and reference engines, its sidecar and the
services, each a child process on loopback ports, plus a demo tenant, admin key and two models
(`demo_models.py`: a real one, `demo-chat`, and the reference engine, `demo-reference`).

`Stack.up()` returns only when every service answers SERVING and a generation can be routed;
`Stack.down()` stops everything it started, in reverse order. In between, a supervisor
(`supervisor.py`) restarts any process that dies, with backoff; two scheduler instances run, as
in the Kubernetes base, so a scheduler's death (or restart) routes through the other. The state of
a detached stack (process ids, endpoints) is kept in `<state dir>/stack.json`, so
`meshctl stack down` can stop it from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends.triton.control import write_token
from backends.triton.kv_event_socket import events_directory_for
from backends.triton.launcher import kill_leftovers
from deploy.local.certificates import make_mesh_certificates
from deploy.local.demo_models import DEMO_MODEL, REFERENCE_MODEL, prepare
from deploy.local.etcd_server import EtcdServer
from deploy.local.prometheus import PrometheusServer
from deploy.local.state import StackInfo, files_for, forget_state, load_state, write_state
from deploy.local.supervisor import Supervisor
from infermesh.v1 import inference_pb2, inference_pb2_grpc, registry_pb2
from services.common import errors, etcd, tls
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess, pid_alive, stop_pid
from services.common.telemetry import HONOUR_CLIENT_SAMPLED
from services.common.tenancy import Tenant, TenantPlan, TenantStore
from services.registry.client import RegistryClient
from services.registry.manifest import served_model_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_TENANT = "demo"
SERVICES = ("registry", "ratelimit", "scheduler", "scheduler-2", "auditor", "gateway")
MODULES = {name: f"services.{name.split('-')[0]}" for name in SERVICES}  # scheduler-2: a second
# supervisor: whoever runs the stack (stops it first, or it would restart what is being stopped)
STOP_ORDER = ("supervisor", "prometheus", "gateway", "sidecar", "scheduler", "scheduler-2",
              "ratelimit", "registry", "auditor", "triton", "traces", "etcd")


@dataclass
class StackOptions:
    state_dir: pathlib.Path
    demo_plan: TenantPlan = field(default_factory=TenantPlan)
    gateway_env: dict[str, str] = field(default_factory=dict)  # extra INFERMESH_* for the gateway
    triton_log_verbose: bool = False
    supervise: bool = True  # restart any process that dies (with backoff)
    # Mutual TLS with a CA made at `up` (certificates.py); False: plaintext development (on
    # loopback, with a mesh token), for comparisons such as the TLS benchmark.
    tls: bool = True
    # The demo models to register (None: all); a stack for one measurement can skip the real
    # model's load (~0.8 GB and a few seconds).
    models: tuple[str, ...] | None = None
    # Traces: a receiver of the stack (traces.py) writes every service's spans here as OTLP
    # JSON lines, sampling `trace_sample_ratio` of the generations; with
    # `honour_client_sampled`, every one whose client sent a sampled `traceparent` too (the
    # gateway's INFERMESH_TRACES_HONOUR_CLIENT_SAMPLED, off in production by default).
    traces_dir: pathlib.Path | None = None
    trace_sample_ratio: float = 1.0
    honour_client_sampled: bool = False


class Stack:
    def __init__(self, options: StackOptions):
        self.options = options
        self.state_dir = options.state_dir
        self.logs = self.state_dir / "logs"
        self.children: dict[str, ChildProcess] = {}
        self.info: StackInfo | None = None
        self.supervisor: Supervisor | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def up(self, timeout_s: float = 90.0) -> StackInfo:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        blob_dir = self.state_dir / "data" / "blobs"
        # Blobs into the registry's store; the first time on a machine this converts the GGUF
        # (~15-30 s), so it comes before the start-up deadline. Triton starts with an empty
        # repository: the sidecar renders there each version placed on the replica, from the
        # files it fetches from the registry.
        manifests = [m for m in prepare(blob_dir)
                     if self.options.models is None or m.name in self.options.models]
        repository = self.state_dir / "models"
        shutil.rmtree(repository, ignore_errors=True)
        repository.mkdir(parents=True)
        deadline = time.monotonic() + timeout_s
        try:
            tls_dir = self.state_dir / "tls"
            if self.options.tls:
                make_mesh_certificates(tls_dir)
            etcd_server = EtcdServer(
                self.state_dir / "data" / "etcd", self.logs / "etcd.log",
                certificates=files_for(tls_dir, "etcd") if self.options.tls else None)
            etcd_server.start()
            self.children["etcd"] = etcd_server.process
            ports = {name: free_port() for name in (*SERVICES, "sidecar")}
            metrics = {name: free_port() for name in (*SERVICES, "sidecar")}
            triton = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
            openai_port = free_port()
            # Triton's model control answers only its sidecar, which alone is told this file.
            control_token = self.state_dir / "triton-control-token"
            write_token(control_token)
            endpoints = {name: f"{LOOPBACK}:{port}" for name, port in ports.items()}
            self.info = info = StackInfo(
                gateway=endpoints["gateway"], api_key="", model=DEMO_MODEL,
                reference_model=REFERENCE_MODEL, etcd=etcd_server.endpoint, endpoints=endpoints,
                metrics={}, pids={},
                mesh_token="" if self.options.tls else secrets.token_urlsafe(32),
                tls_dir=str(tls_dir) if self.options.tls else "",
                openai_base_url=(f"{'https' if self.options.tls else 'http'}://{LOOPBACK}:"
                                 f"{openai_port}/v1"),
                triton_control_token_file=str(control_token),
                traces_dir=str(self.options.traces_dir or ""),
            )
            tracing = self._start_traces(deadline)
            self._start(
                "triton",
                [sys.executable, "-m", "backends.triton.launcher",
                 "--grpc-port", str(triton["grpc"]), "--http-port", str(triton["http"]),
                 "--metrics-port", str(triton["metrics"]),
                 "--model-repository", str(repository),
                 "--workdir", str(self.state_dir / "triton"),
                 "--control-token-file", str(control_token)],
                info.service_security("triton"),
            )
            base = {"INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint, **tracing}
            for name in SERVICES:
                extra = {**base, **info.service_security(name.split("-")[0])}
                if name == "auditor":
                    extra["INFERMESH_AUDITOR_DATA_DIR"] = str(self.state_dir / "data" / "auditor")
                if name == "gateway":
                    extra["INFERMESH_BLOB_CACHE_DIR"] = str(
                        self.state_dir / "data" / "gateway" / "blobs")
                    extra["INFERMESH_HTTP_PORT"] = str(openai_port)
                    extra["INFERMESH_AUDIT_SPOOL_DIR"] = str(
                        self.state_dir / "data" / "gateway" / "audit-spool")
                    extra.update(self.options.gateway_env)
                if name == "registry":
                    extra["INFERMESH_REGISTRY_BLOB_DIR"] = str(blob_dir)
                self._start_service(name, MODULES[name], ports[name], metrics[name], extra)
            self._start_service(
                "sidecar", "backends.triton.sidecar", ports["sidecar"], metrics["sidecar"],
                {**base, **info.service_security("sidecar"),
                 "INFERMESH_TRITON_GRPC_ENDPOINT": f"{LOOPBACK}:{triton['grpc']}",
                 "INFERMESH_TRITON_METRICS_ENDPOINT": f"{LOOPBACK}:{triton['metrics']}",
                 "INFERMESH_TRITON_CONTROL_TOKEN_FILE": str(control_token),
                 "INFERMESH_KV_EVENTS_DIR": str(events_directory_for(self.state_dir / "triton")),
                 "INFERMESH_REPLICA_ID": "replica-0",
                 "INFERMESH_MODEL_REPOSITORY": str(repository),
                 "INFERMESH_BLOB_CACHE_DIR": str(self.state_dir / "data" / "replica-0" / "blobs"),
                 "INFERMESH_ZONE": "local",
                 # Within `down()`'s 15 s per child; the gateway is stopped first, so a drain
                 # here only waits for generations that outlived it.
                 "INFERMESH_DRAIN_TIMEOUT_S": "10"},
            )
            client_tls = info.client_tls()
            for name in (*SERVICES, "sidecar"):
                wait_serving(self.children[name], endpoints[name], deadline, client_tls,
                             name.split("-")[0])
            api_key, triton_models = asyncio.run(
                self._bootstrap(etcd_server.endpoint, manifests, deadline)
            )
            endpoints["triton"] = f"{LOOPBACK}:{triton['grpc']}"
            endpoints["triton-http"] = f"{LOOPBACK}:{triton['http']}"  # KServe v2 and generate
            metric_endpoints = {name: f"{LOOPBACK}:{port}" for name, port in metrics.items()}
            metric_endpoints["triton"] = f"{LOOPBACK}:{triton['metrics']}"
            metric_endpoints["etcd"] = etcd_server.metrics_endpoint
            prometheus = PrometheusServer(self.state_dir, self.logs / "prometheus.log",
                                          metric_endpoints)
            self.children["prometheus"] = prometheus.process
            prometheus.start()
            endpoints["prometheus"] = prometheus.endpoint
            self.info.api_key, self.info.metrics = api_key, metric_endpoints
            self.info.pids, self.info.triton_models = self._pids(), triton_models
            write_state(self.state_dir, self.info)
            if self.options.supervise:
                self._supervise(self.state_dir / "triton")
            return self.info
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stops every child, in STOP_ORDER and then any other, even if one stop fails."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        order = [n for n in STOP_ORDER if n in self.children]
        order += [n for n in self.children if n not in STOP_ORDER]
        try:
            for name in order:
                child = self.children.pop(name)
                try:
                    child.stop(grace_s=15.0)
                except Exception as exc:  # keep stopping the rest; say which one resisted
                    print(f"could not stop {name} (pid {child.pid}): {exc!r}", file=sys.stderr)
        finally:
            for child in self.children.values():  # interrupted above: kill what is left
                child.stop(grace_s=0.0)
            self.children.clear()
            forget_state(self.state_dir)

    def failed_children(self) -> list[str]:
        return [name for name, child in self.children.items() if not child.alive()]

    def _pids(self) -> dict[str, int]:
        pids = {name: child.pid for name, child in self.children.items()}
        if self.options.supervise:
            pids["supervisor"] = os.getpid()
        return pids

    def _supervise(self, triton_workdir: pathlib.Path) -> None:
        def pids_changed() -> None:
            if self.info is not None:
                self.info.pids = self._pids()
                write_state(self.state_dir, self.info)

        self.supervisor = Supervisor(self.state_dir, on_restart=pids_changed)
        for name, child in self.children.items():
            # A killed launcher leaves its tritonserver (holding the ports) and stubs behind.
            self.supervisor.watch(
                child, (lambda: kill_leftovers(triton_workdir)) if name == "triton" else None)
        self.supervisor.start()

    # -- helpers -------------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self._run(ChildProcess(name, argv, self.logs / f"{name}.log", env={**os.environ, **env},
                               cwd=REPO_ROOT))

    def _start_service(
        self, name: str, module: str, port: int, metrics_port: int, env: dict[str, str]
    ) -> None:
        self._run(service_process(
            name, module, self.logs / f"{name}.log", port,
            {**env, "INFERMESH_METRICS_PORT": str(metrics_port),
             "INFERMESH_INSTANCE_ID": f"{name}-local"}))

    def _start_traces(self, deadline: float) -> dict[str, str]:
        """Starts the trace receiver when the options ask for traces; returns the OTEL_*
        variables that point every service at it ({} without)."""
        if self.options.traces_dir is None:
            return {}
        receiver, env = start_trace_receiver(self.options.traces_dir, self.logs / "traces.log",
                                             self.options.trace_sample_ratio, deadline,
                                             self.options.honour_client_sampled)
        self.children["traces"] = receiver
        return env

    def _run(self, child: ChildProcess) -> None:
        child.start()
        self.children[child.name] = child

    async def _bootstrap(
        self, etcd_endpoint: str, manifests: list[registry_pb2.ModelManifest], deadline: float,
    ) -> tuple[str, dict[str, str]]:
        """Demo tenant, admin key and models; returns once the gateway can serve every model,
        with the key and each model's Triton model."""
        assert self.info is not None
        client = etcd.connect(etcd_endpoint, 5.0, self.info.client_tls())
        async with client:
            tenants = TenantStore(client)
            await tenants.put_tenant(Tenant(DEMO_TENANT, "Demo tenant", self.options.demo_plan))
            api_key, _ = await tenants.issue_key(DEMO_TENANT, role="admin")
        triton_models = {}
        for manifest in manifests:
            version = await register_demo_model(self.info, api_key, manifest, deadline)
            triton_models[manifest.name] = served_model_name(manifest.name, version)
        for manifest in manifests:
            await self._wait_routable(api_key, manifest.name, deadline)
        return api_key, triton_models

    async def _wait_routable(self, api_key: str, model: str, deadline: float) -> None:
        """Until a one-token generation succeeds: keys, model, tokenizer and replica are all
        visible."""
        metadata = (("authorization", f"Bearer {api_key}"),)
        request = inference_pb2.GenerateRequest(
            model=model, prompt="warm up", params=inference_pb2.SamplingParams(max_tokens=1)
        )
        assert self.info is not None
        async with self.info.channel() as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while True:
                try:
                    await stub.Generate(request, metadata=metadata, timeout=10)
                    return
                except grpc.aio.AioRpcError as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the gateway cannot serve {model}: {exc}") from exc
                await asyncio.sleep(0.2)


async def register_demo_model(
    stack: StackInfo, api_key: str, manifest: registry_pb2.ModelManifest, deadline: float
) -> str:
    """Registers a demo manifest through the Registry API and makes it production (unless it
    already is); returns its version id. Retries while the registry has not yet seen the
    freshly issued key."""
    async with RegistryClient(stack.endpoints["registry"], api_key, timeout_s=5.0,
                              mesh_tls=stack.client_tls()) as client:
        while True:
            try:
                reply = await client.register(manifest)
                break
            except errors.Unauthenticated:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        routing = await client.routing(manifest.name)
        if routing.production != reply.version_id:
            await client.change(manifest.name, "the embedded stack's demo model", routing.revision,
                                promote=registry_pb2.Promote(version_id=reply.version_id))
        return reply.version_id


def service_process(name: str, module: str, log_path: pathlib.Path, port: int,
                    settings: dict[str, str]) -> ChildProcess:
    """`python -m <module>` (a service, or the sidecar) from the repository root: gRPC on
    `port`, metrics on a free port, instance id `name`, then `settings` (INFERMESH_*, which may
    override those) over this process's environment."""
    env = {**os.environ, "INFERMESH_PORT": str(port), "INFERMESH_METRICS_PORT": str(free_port()),
           "INFERMESH_INSTANCE_ID": name, **settings}
    return ChildProcess(name, [sys.executable, "-m", module], log_path, env=env, cwd=REPO_ROOT)


def wait_serving(child: ChildProcess, endpoint: str, deadline: float,
                 mesh_tls: tls.MeshTls | None = None, peer_kind: str | None = None) -> None:
    """Returns once `child`'s gRPC health says SERVING; raises if it exits or the deadline
    passes (with the tail of its log). `mesh_tls`, `peer_kind`: as `tls.channel` (None: a
    plaintext-development process)."""
    with tls.blocking_channel(endpoint, peer_kind, mesh_tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited during start-up:\n{child.log_tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not SERVING in time:\n{child.log_tail()}")
            time.sleep(0.1)


def start_trace_receiver(directory: pathlib.Path, log_path: pathlib.Path, sample_ratio: float,
                         deadline: float, honour_client_sampled: bool = False
                         ) -> tuple[ChildProcess, dict[str, str]]:
    """The receiver (traces.py) writing into `directory`, listening once this returns, and the
    variables that point a service at it, sampling `sample_ratio` of the generations (and,
    `honour_client_sampled`, every one whose client sent a sampled parent)."""
    port = free_port()
    receiver = ChildProcess("traces", [sys.executable, "-m", "deploy.local.traces", "--port",
                                       str(port), "--dir", str(directory)],
                            log_path, env=dict(os.environ), cwd=REPO_ROOT)
    receiver.start()
    wait_listening(receiver, port, deadline)
    return receiver, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{LOOPBACK}:{port}",
                      "OTEL_EXPORTER_OTLP_INSECURE": "true",
                      "OTEL_TRACES_SAMPLER_ARG": str(sample_ratio),  # parent-based: ours
                      HONOUR_CLIENT_SAMPLED: str(honour_client_sampled).lower(),
                      "OTEL_BSP_SCHEDULE_DELAY": "200"}  # ms: a trace is readable right after


def wait_listening(child: ChildProcess, port: int, deadline: float) -> None:
    """Returns once `child` accepts connections on the loopback `port`."""
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited during start-up:\n{child.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name} not listening in time:\n{child.log_tail()}")
        time.sleep(0.05)


def stop_detached(state_dir: pathlib.Path) -> list[str]:
    """Stops a stack started by another process, from its `stack.json`; returns what it stopped."""
    info = load_state(state_dir)
    if info is None:
        return []
    stopped = []
    for name in STOP_ORDER:
        pid = info.pids.get(name)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            # The supervisor stops the whole stack itself on SIGTERM; give it the time to.
            stop_pid(pid, grace_s=180.0 if name == "supervisor" else 15.0)
            stopped.append(name)
    forget_state(state_dir)
    return stopped
