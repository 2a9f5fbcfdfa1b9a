"""`meshctl replicas`: what the scheduler routes on, a line per replica and model — for an
operator asking "where is this model served, and why is that replica getting no traffic?"."""

from __future__ import annotations

from typing import Any

import typer

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from meshctl.client import TIMEOUT_S
from meshctl.output import OUTPUT, Column, OutputFormat, emit, is_structured, message_dict
from meshctl.rpc import call
from meshctl.times import format_duration

BREAKER = {"BREAKER_STATE_UNSPECIFIED": "?", "BREAKER_STATE_CLOSED": "closed",
           "BREAKER_STATE_OPEN": "open", "BREAKER_STATE_HALF_OPEN": "half-open"}


def routable(replica: dict[str, Any]) -> str:
    if not replica["unroutable_because"]:
        return "yes"
    return f"no: fails {replica['unroutable_because']!r}"


def rows(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per replica and model (each model's KV cache and queue on its own line); the
    replica's own cells only on its first line."""
    out = []
    for replica in replicas:
        loads = {load["triton_model"]: load for load in replica.get("loads", [])}
        views = {view["triton_model"]: view for view in replica.get("kv_views", [])}
        models = sorted(set(replica["models"]) | set(loads)) or [""]
        for i, model in enumerate(models):
            out.append({"replica": replica if i == 0 else None, "model": model,
                        "load": loads.get(model), "zone": replica["zone"],
                        "view": views.get(model)})
    return out


def _replica(field: Any) -> Any:
    return lambda row: field(row["replica"]) if row["replica"] is not None else " "


def cache_view(row: dict[str, Any]) -> str:
    """Where the scheduler's view of the model's KV cache comes from: the engine's events (and
    their lag), or the approximate guess from routing history."""
    view = row["view"]
    if not view:
        return "-"
    if view["source"] != "events":
        return view["source"]
    return f"events/{view['lag_s'] * 1000:.0f}ms-lag"


def _load(field: str) -> Any:
    return lambda row: row["load"][field] if row["load"] else "-"


COLUMNS = [
    Column("REPLICA", _replica(lambda r: r["replica_id"])),
    Column("ZONE", _replica(lambda r: r["zone"])),
    Column("ROUTABLE", _replica(routable)),
    Column("BREAKER", _replica(lambda r: BREAKER.get(r["breaker"], r["breaker"]))),
    Column("IN-FLIGHT", _replica(lambda r: r["in_flight"]), right=True),
    Column("MODEL", lambda row: row["model"]),
    Column("KV FREE/MAX", lambda row: f"{row['load']['kv_free_blocks']}/"
           f"{row['load']['kv_max_blocks']}" if row["load"] else "-", right=True),
    Column("ACTIVE", _load("active"), right=True),
    Column("WAITING", _load("waiting"), right=True),
    Column("CACHE-VIEW", cache_view),
    Column("MAX", _load("max"), right=True, wide=True),
    Column("ENDPOINT", _replica(lambda r: r["grpc_endpoint"]), wide=True),
    Column("GPU", _replica(lambda r: r["gpu_type"]), wide=True),
    Column("DRAINING", _replica(lambda r: r["draining"]), wide=True),
    Column("LOAD-AGE", _replica(lambda r: format_duration(r["load_age_s"])), wide=True),
]


def replicas(
    scheduler: str = typer.Option(None, "--scheduler", help="host:port [env INFERMESH_SCHEDULER]"),
    output: OutputFormat = OUTPUT,
    as_json: bool = typer.Option(False, "--json", hidden=True, help="The same as -o json."),
) -> None:
    """Every replica the scheduler knows: zone, whether it is routable (and if not, why), its
    breaker, the requests it holds, and each model's KV cache and queue, and where the
    scheduler's view of that cache comes from (the engine's KV events and their lag, or
    approximate). Ask one scheduler: reservations and breakers are that instance's own."""

    async def list_replicas(channel) -> scheduler_pb2.ListReplicasResponse:
        return await scheduler_pb2_grpc.SchedulerStub(channel).ListReplicas(
            scheduler_pb2.ListReplicasRequest(), timeout=TIMEOUT_S)

    reply = call("scheduler", scheduler, list_replicas)
    data = message_dict(reply)
    if as_json:
        output = OutputFormat.json
    if is_structured(output):
        emit(output, data, [])
        return
    emit(output, data, COLUMNS, rows=rows(data["replicas"]))
