"""The RateLimit gRPC servicer over `limits.Ledger`: quota leases for gateways, with tenant plans
from a watch cache and month-to-date budgets kept in etcd.

Tenants are spread over the ratelimit replicas by rendezvous hashing over their registrations
(`rendezvous_owner`, the same function the gateways use). A replica learns a tenant's
budget from etcd when it first sees it, and forgets a tenant (after writing its usage out) once
the hashing gives it to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import Counter, Gauge

from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import errors, etcd, status
from services.common.discovery import ServiceDirectory, rendezvous_owner
from services.common.frames import add_servicer
from services.common.logs import get_logger
from services.common.runtime import ServiceContext, ServiceParts
from services.common.tenancy import Tenant, parse_tenant
from services.ratelimit.budgets import BudgetStore, current_month
from services.ratelimit.limits import Amounts, Ledger
from services.ratelimit.settings import RateLimitSettings

log = get_logger(__name__)
LEASES = Counter("infermesh_ratelimit_leases_total", "Lease calls, by outcome.",
                 ["tenant", "outcome"])
SLOTS = Gauge("infermesh_ratelimit_slots_leased", "Concurrency slots gateways hold.", ["tenant"])
USED = Counter("infermesh_ratelimit_tokens_reported_total", "Tokens reported used.",
               ["tenant", "kind"])
MAX_AMOUNT = 10**9
BUDGET_FLUSH_S = 1.0


def amounts(message: ratelimit_pb2.Allowance, field: str) -> Amounts:
    for name in ("requests", "input_tokens", "output_tokens", "slots"):
        if not 0 <= getattr(message, name) <= MAX_AMOUNT:
            raise errors.InvalidArgument(f"{field}.{name}", f"must be in [0, {MAX_AMOUNT}]")
    return Amounts(message.requests, message.input_tokens, message.output_tokens, message.slots)


class RateLimitServicer(ratelimit_pb2_grpc.RateLimitServicer):
    def __init__(self, tenants: etcd.WatchCache[Tenant], ledger: Ledger, budgets: BudgetStore,
                 clock=time.monotonic):
        self._tenants = tenants
        self._ledger = ledger
        self._budgets = budgets
        self._clock = clock

    def _tenant(self, tenant_id: str) -> Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise errors.NotFound(f"tenant {tenant_id!r} does not exist")
        return tenant

    async def Lease(self, request, context):
        try:
            tenant = self._tenant(request.tenant)
            if not 1 <= len(request.gateway_id) <= 128:
                raise errors.InvalidArgument("gateway_id", "must be 1-128 characters")
            need = amounts(request.need, "need")
            want = amounts(request.want, "want")
            give_back = amounts(request.give_back, "give_back")
            for field in ("used_input_tokens", "used_output_tokens"):
                if not 0 <= getattr(request, field) <= MAX_AMOUNT:
                    raise errors.InvalidArgument(field, f"must be in [0, {MAX_AMOUNT}]")
            if not self._ledger.knows(tenant.tenant_id):  # new here: its budget is in etcd
                used = await self._budgets.load(current_month(), tenant.tenant_id)
                self._ledger.restore_budget(tenant.tenant_id, tenant.plan, used, self._clock())
        except errors.MeshError as exc:
            await status.abort(context, exc)
        decision = self._ledger.lease(
            tenant.tenant_id, tenant.plan, request.gateway_id, self._clock(), need, want,
            give_back, request.used_input_tokens, request.used_output_tokens,
        )
        LEASES.labels(tenant.tenant_id, decision.reason or "granted").inc()
        SLOTS.labels(tenant.tenant_id).set(self._ledger.usage(tenant.tenant_id)[1])
        USED.labels(tenant.tenant_id, "input").inc(request.used_input_tokens)
        USED.labels(tenant.tenant_id, "output").inc(request.used_output_tokens)
        granted = decision.granted
        return ratelimit_pb2.LeaseResponse(
            granted=ratelimit_pb2.Allowance(
                requests=granted.requests, input_tokens=granted.input_tokens,
                output_tokens=granted.output_tokens, slots=granted.slots),
            ttl=status.seconds_to_duration(decision.ttl_s),
            reason=decision.reason,
            message=decision.message,
            retry_after=status.seconds_to_duration(decision.retry_after_s),
        )

    async def GetUsage(self, request, context):
        try:
            tenant = self._tenant(request.tenant)
            if not self._ledger.knows(tenant.tenant_id):
                used = await self._budgets.load(current_month(), tenant.tenant_id)
                self._ledger.restore_budget(tenant.tenant_id, tenant.plan, used, self._clock())
        except errors.MeshError as exc:
            await status.abort(context, exc)
        used, slots = self._ledger.usage(tenant.tenant_id)
        return ratelimit_pb2.TenantUsage(
            tenant=tenant.tenant_id, month=current_month(), tokens_used=used,
            monthly_token_budget=tenant.plan.monthly_token_budget, slots_leased=slots,
        )


async def keep_budgets(store: BudgetStore, ledger: Ledger, directory: ServiceDirectory,
                       endpoint: str) -> None:
    """Writes usage out every BUDGET_FLUSH_S, starts each month afresh, and forgets tenants the
    hashing now gives to another replica (after writing their usage out)."""
    month = current_month()
    while True:
        await asyncio.sleep(BUDGET_FLUSH_S)
        try:
            await store.flush(month, {t: ledger.budget_used(t) for t in ledger.tenants()})
            replicas = directory.endpoints("ratelimit")
            for tenant in ledger.tenants():
                if (replicas and endpoint in replicas
                        and rendezvous_owner(tenant, replicas) != endpoint):
                    ledger.forget(tenant)
            if current_month() != month:
                month = current_month()
                ledger.new_month()
        except Exception as exc:  # etcd away: keep counting in memory, write when it is back
            log.warning("budget_flush_failed", error=repr(exc))


async def setup(ctx: ServiceContext) -> ServiceParts:
    tenants: etcd.WatchCache[Tenant] = etcd.WatchCache(ctx.etcd, etcd.Keys.tenants, parse_tenant)
    directory = ServiceDirectory(ctx.etcd, ctx.tls, ctx.settings.mesh_token.get_secret_value())
    await tenants.start()
    await directory.start()
    assert isinstance(ctx.settings, RateLimitSettings)
    ledger = Ledger(ttl_s=ctx.settings.lease_ttl_s)
    store = BudgetStore(ctx.etcd)
    flusher = asyncio.create_task(keep_budgets(store, ledger, directory, ctx.endpoint),
                                  name="budgets")
    add_servicer(  # a malformed frame → INVALID_ARGUMENT, never UNKNOWN
        ctx.server, RateLimitServicer(tenants, ledger, store),
        ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimit"], refuse_malformed=True,
    )

    async def cleanup() -> None:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ctx.settings.etcd_timeout_s):
                await store.flush(current_month(),
                                  {t: ledger.budget_used(t) for t in ledger.tenants()})
        await directory.close()
        await tenants.stop()

    return ServiceParts(
        [ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimit"].full_name], cleanup=cleanup
    )
