"""The RateLimit gRPC servicer over `limits.Limiter`, with tenant plans from a watch cache."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import errors, etcd, status
from services.common.runtime import ServiceContext, ServiceParts
from services.common.tenancy import Tenant, parse_tenant
from services.ratelimit.limits import Limiter

DECISIONS = Counter(
    "infermesh_ratelimit_decisions_total", "Admission decisions.", ["tenant", "outcome"]
)
IN_FLIGHT = Gauge("infermesh_ratelimit_in_flight", "Concurrency slots held.", ["tenant"])
MAX_HOLD_S = 3600.0


class RateLimitServicer(ratelimit_pb2_grpc.RateLimitServicer):
    def __init__(self, tenants: etcd.WatchCache[Tenant], limiter: Limiter, clock=time.monotonic):
        self._tenants = tenants
        self._limiter = limiter
        self._clock = clock

    async def Acquire(self, request, context):
        tenant = self._tenants.get(request.tenant)
        if tenant is None:
            DECISIONS.labels(request.tenant[:64], "unknown_tenant").inc()
            await status.abort(context, errors.NotFound(f"tenant {request.tenant!r} does not exist"))
        hold_s = request.hold.ToTimedelta().total_seconds()
        if not 0 < hold_s <= MAX_HOLD_S:
            await status.abort(
                context, errors.InvalidArgument("hold", f"must be in (0, {MAX_HOLD_S:.0f}] seconds")
            )
        now = self._clock()
        decision = self._limiter.acquire(tenant.tenant_id, tenant.plan, now, hold_s)
        DECISIONS.labels(tenant.tenant_id, "allowed" if decision.allowed else decision.reason).inc()
        IN_FLIGHT.labels(tenant.tenant_id).set(self._limiter.in_flight(tenant.tenant_id, now))
        return ratelimit_pb2.AcquireResponse(
            allowed=decision.allowed,
            slot_id=decision.slot_id,
            reason=decision.reason,
            message=decision.message,
            retry_after=status.seconds_to_duration(decision.retry_after_s),
        )

    async def Release(self, request, context):
        released = self._limiter.release(request.tenant, request.slot_id)
        IN_FLIGHT.labels(request.tenant[:64]).set(
            self._limiter.in_flight(request.tenant, self._clock())
        )
        return ratelimit_pb2.ReleaseResponse(released=released)


async def setup(ctx: ServiceContext) -> ServiceParts:
    tenants: etcd.WatchCache[Tenant] = etcd.WatchCache(ctx.etcd, etcd.Keys.tenants, parse_tenant)
    await tenants.start()
    ratelimit_pb2_grpc.add_RateLimitServicer_to_server(
        RateLimitServicer(tenants, Limiter()), ctx.server
    )
    return ServiceParts(
        [ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimit"].full_name], cleanup=tenants.stop
    )
