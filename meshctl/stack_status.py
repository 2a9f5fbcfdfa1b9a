"""`meshctl stack status`: every process of the embedded stack, whether it is alive and healthy,
how often its supervisor restarted it, and how the gateway routes (schedulers or its fallback)."""

from __future__ import annotations

import pathlib
import urllib.request
from dataclasses import asdict, dataclass

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.state import StackInfo, load_state
from deploy.local.supervisor import load_status
from meshctl.config import DEFAULT_STATE_DIR
from meshctl.exits import ExitCode, fail_local
from meshctl.output import OUTPUT, Column, OutputFormat, emit
from services.common import tls
from services.common.processes import pid_alive

GRPC_HEALTH = ("gateway", "registry", "ratelimit", "scheduler", "scheduler-2", "auditor",
               "sidecar")
TIMEOUT_S = 1.0


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int | None
    alive: bool
    health: str  # SERVING, NOT_SERVING, unreachable, ready, - (nothing to ask)
    restarts: int | None  # None: not supervised
    last_exit: int | None


def _grpc_health(info: StackInfo, name: str) -> str:
    try:
        with tls.blocking_channel(info.endpoints[name], name.split("-")[0],
                                  info.client_tls()) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=TIMEOUT_S)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return "unreachable" if exc.code() in unreachable else exc.code().name


def _http_ok(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            return "ready" if reply.status == 200 else f"http {reply.status}"
    except OSError:
        return "unreachable"


def _health(info: StackInfo, name: str) -> str:
    if name in GRPC_HEALTH and name in info.endpoints:
        return _grpc_health(info, name)
    if name == "etcd":
        return _http_ok(f"http://{info.metrics['etcd']}/health")
    if name == "triton" and "triton" in info.metrics:
        return _http_ok(f"http://{info.metrics['triton']}/metrics")
    if name == "prometheus" and "prometheus" in info.endpoints:
        return _http_ok(f"http://{info.endpoints['prometheus']}/-/ready")
    return "-"


def process_statuses(state_dir: pathlib.Path) -> tuple[StackInfo, list[ProcessStatus]] | None:
    info = load_state(state_dir)
    if info is None:
        return None
    supervised = load_status(state_dir) or {}
    processes = supervised.get("processes", {})
    assert isinstance(processes, dict)
    statuses = []
    for name, pid in info.pids.items():
        seen = processes.get(name, {})
        alive = pid_alive(pid)
        statuses.append(ProcessStatus(
            name, pid, alive, _health(info, name) if name != "supervisor" else "-",
            seen.get("restarts") if name in processes else None, seen.get("last_exit")))
    return info, statuses


def gateway_routing(info: StackInfo) -> str:
    """`schedulers` or `fallback`, and the fallback routes counted so far, from its /metrics."""
    try:
        with urllib.request.urlopen(f"http://{info.metrics['gateway']}/metrics",
                                    timeout=TIMEOUT_S) as reply:
            text = reply.read().decode()
    except (OSError, KeyError):
        return "unknown (gateway metrics unreachable)"
    values = {}
    for line in text.splitlines():
        if line.startswith(("infermesh_gateway_fallback_routing ",
                            "infermesh_gateway_fallback_routes_total ")):
            name, value = line.split()
            values[name] = float(value)
    mode = "fallback (no scheduler answers)" if values.get(
        "infermesh_gateway_fallback_routing") else "schedulers"
    return f"{mode}; fallback routes so far: " \
           f"{int(values.get('infermesh_gateway_fallback_routes_total', 0))}"


COLUMNS = [
    Column("PROCESS", lambda p: p["name"]), Column("PID", lambda p: p["pid"], right=True),
    Column("ALIVE", lambda p: "yes" if p["alive"] else "NO"),
    Column("HEALTH", lambda p: p["health"]),
    Column("RESTARTS", lambda p: p["restarts"], right=True),
    Column("LAST EXIT", lambda p: "" if p["last_exit"] is None else p["last_exit"]),
]


def stack_status(
    state_dir: pathlib.Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir"),
    output: OutputFormat = OUTPUT,
) -> None:
    """Each process of the stack: pid, alive, health, restarts by the supervisor; gateway
    routing. Exit 5 when no stack is recorded, 1 when a process is down."""
    found = process_statuses(state_dir)
    if found is None:
        fail_local(f"no stack is recorded in {state_dir}", ExitCode.NOT_FOUND)
    info, statuses = found
    processes = [asdict(s) for s in statuses]
    routing = gateway_routing(info)
    emit(output, {"processes": processes, "gateway_routing": routing,
                  "gateway": info.gateway, "state_dir": str(state_dir)},
         COLUMNS, rows=processes, after=f"gateway routing: {routing}")
    down = [s.name for s in statuses if not s.alive]
    if down:
        raise typer.Exit(ExitCode.ERROR)
