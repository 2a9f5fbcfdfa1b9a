"""The Scheduler gRPC servicer: replicas from the sidecars' leased records, routing by `Router`."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import errors, etcd, status
from services.common.runtime import ServiceContext, ServiceParts
from services.scheduler.routing import ReplicaInfo, Router

ROUTES = Counter("infermesh_scheduler_routes_total", "Route decisions.", ["model", "outcome"])
REPLICAS = Gauge("infermesh_scheduler_replicas", "Replicas known, by health.", ["healthy"])
MAX_HOLD_S = 3600.0


def parse_replica(_suffix: str, raw: bytes) -> ReplicaInfo:
    return ReplicaInfo.from_record(etcd.decode(raw))


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, replicas: etcd.WatchCache[ReplicaInfo], router: Router, clock=time.monotonic):
        self._replicas = replicas
        self._router = router
        self._clock = clock

    async def Route(self, request, context):
        hold_s = request.hold.ToTimedelta().total_seconds()
        try:
            if not request.triton_model_name:
                raise errors.InvalidArgument("triton_model_name", "is required")
            if not 0 < hold_s <= MAX_HOLD_S:
                raise errors.InvalidArgument("hold", f"must be in (0, {MAX_HOLD_S:.0f}] seconds")
            reservation = self._router.route(
                self._replicas.items.values(), request.triton_model_name, self._clock(), hold_s,
                exclude=request.exclude_replicas,
            )
        except errors.MeshError as exc:
            ROUTES.labels(request.triton_model_name[:64], exc.code).inc()
            await status.abort(context, exc)
        ROUTES.labels(request.triton_model_name, "OK").inc()
        return scheduler_pb2.RouteResponse(
            replica_id=reservation.replica.replica_id,
            grpc_endpoint=reservation.replica.grpc_endpoint,
            reservation_id=reservation.reservation_id,
        )

    async def Release(self, request, context):
        return scheduler_pb2.ReleaseRouteResponse(
            released=self._router.release(request.reservation_id)
        )

    async def ListReplicas(self, request, context):
        load = self._router.in_flight()
        return scheduler_pb2.ListReplicasResponse(
            replicas=[
                scheduler_pb2.Replica(
                    replica_id=r.replica_id, grpc_endpoint=r.grpc_endpoint,
                    metrics_endpoint=r.metrics_endpoint, zone=r.zone, models=sorted(r.models),
                    healthy=r.healthy, in_flight=load.get(r.replica_id, 0),
                )
                for r in sorted(self._replicas.items.values(), key=lambda r: r.replica_id)
            ]
        )


async def setup(ctx: ServiceContext) -> ServiceParts:
    replicas: etcd.WatchCache[ReplicaInfo] = etcd.WatchCache(
        ctx.etcd, etcd.Keys.replicas, parse_replica,
        on_change=lambda: _count_replicas(replicas),
    )
    await replicas.start()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        SchedulerServicer(replicas, Router()), ctx.server
    )
    return ServiceParts(
        [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name], cleanup=replicas.stop
    )


def _count_replicas(replicas: etcd.WatchCache[ReplicaInfo]) -> None:
    healthy = sum(1 for r in replicas.items.values() if r.healthy)
    REPLICAS.labels("true").set(healthy)
    REPLICAS.labels("false").set(len(replicas.items) - healthy)
