"""`meshctl replicas`: what the scheduler routes on, a line per replica and model — for an
operator asking "where is this model served, and why is that replica getting no traffic?"."""

from __future__ import annotations

import json

import typer
from google.protobuf.json_format import MessageToDict

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from meshctl.config import service_endpoint
from meshctl.rpc import TIMEOUT_S, call

BREAKER = {scheduler_pb2.BREAKER_STATE_UNSPECIFIED: "?",
           scheduler_pb2.BREAKER_STATE_CLOSED: "closed",
           scheduler_pb2.BREAKER_STATE_OPEN: "open",
           scheduler_pb2.BREAKER_STATE_HALF_OPEN: "half-open"}


def routable(replica: scheduler_pb2.Replica) -> str:
    if not replica.unroutable_because:
        return "yes"
    return f"no: fails {replica.unroutable_because!r}"


def lines(replicas: list[scheduler_pb2.Replica]) -> list[str]:
    """A header and one line per replica; each model's KV cache and queue on its own line."""
    out = [f"{'REPLICA':20} {'ZONE':10} {'ROUTABLE':38} {'BREAKER':9} {'IN-FLIGHT':>9}  "
           f"{'MODEL':28} {'KV FREE/MAX':>13} {'ACTIVE':>6} {'WAITING':>7}"]
    for r in replicas:
        head = (f"{r.replica_id:20} {r.zone:10} {routable(r):38} {BREAKER[r.breaker]:9} "
                f"{r.in_flight:>9}  ")
        loads = {load.triton_model: load for load in r.loads}
        models = sorted(set(r.models) | set(loads)) or ["-"]
        for i, model in enumerate(models):
            load = loads.get(model)
            figures = (f"{f'{load.kv_free_blocks}/{load.kv_max_blocks}':>13} {load.active:>6} "
                       f"{load.waiting:>7}" if load else f"{'-':>13} {'-':>6} {'-':>7}")
            prefix = head if i == 0 else " " * len(head)
            out.append(f"{prefix}{model:28} {figures}".rstrip())
    return out


def replicas(
    scheduler: str = typer.Option(None, "--scheduler", help="host:port [env INFERMESH_SCHEDULER]"),
    as_json: bool = typer.Option(False, "--json", help="Print the scheduler's reply as JSON."),
) -> None:
    """Every replica the scheduler knows: zone, whether it is routable (and if not, why), its
    breaker, the requests it holds, and each model's KV cache and queue. Ask one scheduler:
    reservations and breakers are that instance's own."""

    async def list_replicas(channel, metadata) -> scheduler_pb2.ListReplicasResponse:
        return await scheduler_pb2_grpc.SchedulerStub(channel).ListReplicas(
            scheduler_pb2.ListReplicasRequest(), metadata=metadata, timeout=TIMEOUT_S)

    reply = call(service_endpoint("scheduler", scheduler), (), list_replicas)
    if as_json:
        typer.echo(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return
    for line in lines(list(reply.replicas)):
        typer.echo(line)
