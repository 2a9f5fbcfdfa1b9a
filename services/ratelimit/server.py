"""The RateLimit gRPC servicer over `limits.Limiter`, with tenant plans from a watch cache and
month-to-date budgets flushed to etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import Counter, Gauge

from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import errors, etcd, status
from services.common.logs import get_logger
from services.common.runtime import ServiceContext, ServiceParts
from services.common.tenancy import Tenant, parse_tenant
from services.ratelimit.budgets import BudgetStore, current_month
from services.ratelimit.limits import Limiter

log = get_logger(__name__)
DECISIONS = Counter(
    "infermesh_ratelimit_decisions_total", "Admission decisions.", ["tenant", "outcome"]
)
IN_FLIGHT = Gauge("infermesh_ratelimit_in_flight", "Concurrency slots held.", ["tenant"])
COMMITTED = Counter(
    "infermesh_ratelimit_tokens_committed_total", "Tokens charged.", ["tenant", "kind"]
)
MAX_HOLD_S = 3600.0
MAX_TOKENS_PER_REQUEST = 10**9
BUDGET_FLUSH_S = 1.0


class RateLimitServicer(ratelimit_pb2_grpc.RateLimitServicer):
    def __init__(self, tenants: etcd.WatchCache[Tenant], limiter: Limiter, clock=time.monotonic):
        self._tenants = tenants
        self._limiter = limiter
        self._clock = clock

    def _tenant(self, tenant_id: str) -> Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise errors.NotFound(f"tenant {tenant_id!r} does not exist")
        return tenant

    async def Acquire(self, request, context):
        try:
            tenant = self._tenant(request.tenant)
            hold_s = request.hold.ToTimedelta().total_seconds()
            if not 0 < hold_s <= MAX_HOLD_S:
                raise errors.InvalidArgument("hold", f"must be in (0, {MAX_HOLD_S:.0f}] seconds")
            for field in ("input_tokens", "output_tokens"):
                if not 0 <= getattr(request, field) <= MAX_TOKENS_PER_REQUEST:
                    raise errors.InvalidArgument(field, f"must be in [0, {MAX_TOKENS_PER_REQUEST}]")
        except errors.MeshError as exc:
            await status.abort(context, exc)
        now = self._clock()
        decision = self._limiter.acquire(
            tenant.tenant_id, tenant.plan, now, hold_s, request.input_tokens, request.output_tokens
        )
        DECISIONS.labels(tenant.tenant_id, "allowed" if decision.allowed else decision.reason).inc()
        IN_FLIGHT.labels(tenant.tenant_id).set(self._limiter.in_flight(tenant.tenant_id, now))
        return ratelimit_pb2.AcquireResponse(
            allowed=decision.allowed,
            slot_id=decision.slot_id,
            reason=decision.reason,
            message=decision.message,
            retry_after=status.seconds_to_duration(decision.retry_after_s),
            max_tokens=decision.max_tokens,
        )

    async def Release(self, request, context):
        released = self._limiter.settle(
            request.tenant, request.slot_id, request.input_tokens_used, request.output_tokens_used
        )
        if released:
            IN_FLIGHT.labels(request.tenant).set(
                self._limiter.in_flight(request.tenant, self._clock())
            )
            COMMITTED.labels(request.tenant, "input").inc(max(0, request.input_tokens_used))
            COMMITTED.labels(request.tenant, "output").inc(max(0, request.output_tokens_used))
        return ratelimit_pb2.ReleaseResponse(released=released)

    async def GetUsage(self, request, context):
        try:
            tenant = self._tenant(request.tenant)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return ratelimit_pb2.TenantUsage(
            tenant=tenant.tenant_id,
            month=current_month(),
            tokens_used=self._limiter.budget_used(tenant.tenant_id),
            monthly_token_budget=tenant.plan.monthly_token_budget,
            in_flight=self._limiter.in_flight(tenant.tenant_id, self._clock()),
        )


async def keep_budgets(
    store: BudgetStore, limiter: Limiter, tenants: etcd.WatchCache[Tenant], month: str
) -> None:
    """Flushes month-to-date usage every BUDGET_FLUSH_S, and starts a new month on time."""
    while True:
        await asyncio.sleep(BUDGET_FLUSH_S)
        try:
            await store.flush(month, {t: limiter.budget_used(t) for t in tenants.items})
            if current_month() != month:
                month = current_month()
                limiter.new_month()
        except Exception as exc:  # etcd away: keep counting in memory, flush when it is back
            log.warning("budget_flush_failed", error=repr(exc))


async def setup(ctx: ServiceContext) -> ServiceParts:
    tenants: etcd.WatchCache[Tenant] = etcd.WatchCache(ctx.etcd, etcd.Keys.tenants, parse_tenant)
    await tenants.start()
    limiter = Limiter()
    store = BudgetStore(ctx.etcd)
    month = current_month()
    for tenant_id, used in (await store.load(month)).items():
        tenant = tenants.get(tenant_id)
        if tenant is not None:
            limiter.restore_budget(tenant_id, tenant.plan, used, time.monotonic())
    flusher = asyncio.create_task(keep_budgets(store, limiter, tenants, month), name="budgets")
    ratelimit_pb2_grpc.add_RateLimitServicer_to_server(
        RateLimitServicer(tenants, limiter), ctx.server
    )

    async def cleanup() -> None:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                store.flush(current_month(), {t: limiter.budget_used(t) for t in tenants.items}),
                ctx.settings.etcd_timeout_s,
            )
        await tenants.stop()

    return ServiceParts(
        [ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimit"].full_name], cleanup=cleanup
    )
