"""The gateway's side of quotas: requests are admitted against chunks of each tenant's allowance
that this gateway holds under a lease from the ratelimit service — no network call per request.

`acquire_slot` takes one request, the prompt's tokens, max_tokens output tokens and a
concurrency slot from what is held, topping up from the ratelimit replica that owns the tenant
(rendezvous hashing over the live replicas) only when that is not enough; `release_slot` returns
the unused part of the reservation to what is held and counts what was used; `charge_request`
takes one request and nothing else (a response cache hit). A background loop
renews each lease: it reports usage (for the monthly budget), gives back allowance that sat idle
and the slots not in use, and keeps the rest.

If no ratelimit replica answers, the gateway fails open (admits, counting
`infermesh_gateway_quota_fail_open_total`, still capped at the plan's concurrency on this
gateway) or closed (UNAVAILABLE), by `INFERMESH_QUOTA_FAIL_OPEN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter, Histogram

from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.common import errors, status
from services.common.discovery import ServiceDirectory, rendezvous_owner
from services.common.etcd import WatchCache
from services.common.logs import get_logger
from services.common.tenancy import Tenant, TenantPlan, bucket_capacity
from services.gateway.admission import SHED
from services.gateway.peers import Grant

log = get_logger(__name__)
DECISION_SECONDS = Histogram(
    "infermesh_gateway_quota_decision_seconds", "Time to admit or refuse against quota.",
    ["path"], buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2),
)
FAIL_OPEN = Counter("infermesh_gateway_quota_fail_open_total",
                    "Requests admitted without a quota lease (ratelimit unreachable).", ["tenant"])
LEASE_FRACTION = 0.25  # of a bucket's burst asked for at a time, beyond what a request needs

LeaseCall = Callable[[ratelimit_pb2.LeaseRequest], Awaitable[ratelimit_pb2.LeaseResponse]]


@dataclass
class _Held:
    """This gateway's lease on one tenant's allowance."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    slots: int = 0
    slots_in_use: int = 0
    used_input: int = 0  # not reported yet
    used_output: int = 0
    expires: float = 0.0
    last_acquire: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class _Reservation:
    tenant: str
    input_tokens: int
    output_tokens: int
    leased: bool  # False when admitted open, without a lease


class QuotaLeases:
    def __init__(
        self, tenants: WatchCache[Tenant], directory: ServiceDirectory, gateway_id: str,
        timeout_s: float, fail_open: bool, clock: Callable[[], float] = time.monotonic,
    ):
        self._tenants = tenants
        self._directory = directory
        self._gateway_id = gateway_id
        self._timeout_s = timeout_s
        self._fail_open = fail_open
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._task: asyncio.Task[None] | None = None
        self._ttl_s = 10.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_forever(), name="quota leases")

    async def close(self) -> None:
        """Gives back everything held, so the tenants' allowance is not stranded here."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for tenant in list(self._held):
            with contextlib.suppress(Exception):
                await self._renew(tenant, give_back_all=True)

    async def acquire_slot(
        self, tenant: str, request_id: str, input_tokens: int, output_tokens: int
    ) -> Grant:
        """Reserves from what is held, topping up only when short. ResourceExhausted names the
        limit and when to retry."""
        started = time.perf_counter()
        path = "local"
        try:
            plan = self._plan(tenant)
            held = self._held.setdefault(tenant, _Held())
            held.last_acquire = self._clock()
            if not self._covers(held, input_tokens, output_tokens):
                path = "lease"
                async with held.lock:
                    if not self._covers(held, input_tokens, output_tokens):
                        admitted_open = await self._top_up(tenant, plan, held, input_tokens,
                                                           output_tokens)
                        if admitted_open:
                            path = "open"
                            return self._reserve(tenant, held, input_tokens, output_tokens,
                                                 leased=False)
            output_tokens = self._output_grant(held, plan, output_tokens)
            return self._reserve(tenant, held, input_tokens, output_tokens, leased=True)
        except errors.ResourceExhausted as exc:
            SHED.labels(tenant, exc.reason).inc()
            raise
        finally:
            DECISION_SECONDS.labels(path).observe(time.perf_counter() - started)

    async def charge_request(self, tenant: str) -> None:
        """One request against the tenant's requests per minute and nothing else (a response
        cache hit: no tokens, no concurrency slot), from what is held, topping up only when
        none is held. ResourceExhausted as `acquire_slot`'s."""
        started = time.perf_counter()
        path = "local"
        try:
            plan = self._plan(tenant)
            held = self._held.setdefault(tenant, _Held())
            held.last_acquire = self._clock()
            if not self._covers(held, 0, 0, slots=0):
                path = "lease"
                async with held.lock:
                    if not self._covers(held, 0, 0, slots=0) and await self._top_up(
                            tenant, plan, held, 0, 0, slots=0):
                        path = "open"
                        return
            held.requests -= 1
        except errors.ResourceExhausted as exc:
            SHED.labels(tenant, exc.reason).inc()
            raise
        finally:
            DECISION_SECONDS.labels(path).observe(time.perf_counter() - started)

    async def release_slot(
        self, tenant: str, slot_id: str, input_used: int, output_used: int
    ) -> None:
        reservation = self._reservations.pop(slot_id, None)
        held = self._held.get(tenant)
        if reservation is None or held is None:
            return
        held.slots_in_use -= 1
        held.used_input += max(0, input_used)
        held.used_output += max(0, output_used)
        if reservation.leased:
            held.input_tokens += reservation.input_tokens - max(0, input_used)
            held.output_tokens += reservation.output_tokens - min(max(0, output_used),
                                                                  reservation.output_tokens)

    # -- internals -----------------------------------------------------------------------------

    def _plan(self, tenant: str) -> TenantPlan:
        record = self._tenants.get(tenant)
        if record is None:
            raise errors.Unauthenticated(f"tenant {tenant!r} no longer exists")
        return record.plan

    def _covers(self, held: _Held, input_tokens: int, output_tokens: int,
                slots: int = 1) -> bool:
        """Whether what is held serves the request in full (a shortfall here is this gateway's,
        not the tenant's: it tops up before degrading anything)."""
        if held.expires <= self._clock():
            return False
        return (held.requests >= 1 and held.input_tokens >= input_tokens
                and held.output_tokens >= output_tokens
                and held.slots - held.slots_in_use >= slots)

    def _output_grant(self, held: _Held, plan: TenantPlan, output_tokens: int) -> int:
        """max_tokens, or the plan's degraded cap when only that much is held."""
        if held.output_tokens >= output_tokens or not plan.degraded_max_tokens:
            return output_tokens
        return min(output_tokens, plan.degraded_max_tokens)

    def _reserve(self, tenant: str, held: _Held, input_tokens: int, output_tokens: int,
                 leased: bool) -> Grant:
        if leased:
            held.requests -= 1
            held.input_tokens -= input_tokens
            held.output_tokens -= output_tokens
        held.slots_in_use += 1
        slot_id = uuid.uuid4().hex
        self._reservations[slot_id] = _Reservation(tenant, input_tokens, output_tokens, leased)
        return Grant(slot_id, output_tokens)

    async def _top_up(self, tenant: str, plan: TenantPlan, held: _Held, input_tokens: int,
                      output_tokens: int, slots: int = 1) -> bool:
        """Leases what is missing plus headroom. Returns True when admitting open (ratelimit
        unreachable and fail-open); raises ResourceExhausted when the tenant is over a limit."""
        if held.expires <= self._clock():  # the lease lapsed: the ratelimit replica dropped it
            held.requests = held.input_tokens = held.output_tokens = held.slots = 0
        output_needed = output_tokens
        if plan.degraded_max_tokens and held.output_tokens < output_tokens:
            output_needed = min(output_tokens, plan.degraded_max_tokens)
        need = ratelimit_pb2.Allowance(
            requests=max(0, 1 - held.requests),
            input_tokens=max(0, input_tokens - held.input_tokens),
            output_tokens=max(0, output_needed - held.output_tokens),
            slots=max(0, held.slots_in_use + slots - held.slots),
        )
        want = ratelimit_pb2.Allowance(
            requests=need.requests and need.requests + _chunk(plan.requests_per_minute),
            input_tokens=need.input_tokens and need.input_tokens + _chunk(
                plan.input_tokens_per_minute),
            output_tokens=need.output_tokens and max(
                output_tokens - held.output_tokens,
                need.output_tokens + _chunk(plan.output_tokens_per_minute)),
            slots=need.slots,
        )
        try:
            reply = await self._lease(tenant, held, need=need, want=want)
        except errors.Unavailable:
            if not self._fail_open:
                raise
            if slots and held.slots_in_use >= plan.max_concurrency:
                raise errors.ResourceExhausted(
                    f"tenant {tenant!r} has {held.slots_in_use} requests in flight here "
                    f"(max_concurrency={plan.max_concurrency})", reason="concurrency",
                    retry_after_s=0.25) from None
            FAIL_OPEN.labels(tenant).inc()
            return True
        if reply.reason:
            retry_after_s = reply.retry_after.ToTimedelta().total_seconds()
            raise errors.ResourceExhausted(f"{reply.reason}: {reply.message}", reason=reply.reason,
                                           retry_after_s=retry_after_s or None)
        return False

    async def _lease(self, tenant: str, held: _Held, *, need=None, want=None,
                     give_back_all: bool = False) -> ratelimit_pb2.LeaseResponse:
        """One Lease call: reports usage, gives back idle allowance, asks for `need`/`want`.

        What it gives back and reports leaves `held` before the call (so a request admitted
        meanwhile cannot spend it) and comes back only if the call fails."""
        returning = give_back_all or self._clock() - held.last_acquire > self._ttl_s / 3
        give_back = ratelimit_pb2.Allowance(
            requests=max(0, held.requests) if returning else 0,
            input_tokens=max(0, held.input_tokens) if returning else 0,
            output_tokens=max(0, held.output_tokens) if returning else 0,
            slots=max(0, held.slots - held.slots_in_use) if returning else 0,
        )
        request = ratelimit_pb2.LeaseRequest(
            tenant=tenant, gateway_id=self._gateway_id, need=need, want=want,
            give_back=give_back, used_input_tokens=held.used_input,
            used_output_tokens=held.used_output,
        )
        self._apply(held, give_back, request, sign=-1)
        try:
            reply = await self._call(tenant, request)
        except BaseException:
            self._apply(held, give_back, request, sign=+1)
            raise
        held.requests += reply.granted.requests
        held.input_tokens += reply.granted.input_tokens
        held.output_tokens += reply.granted.output_tokens
        held.slots += reply.granted.slots
        self._ttl_s = reply.ttl.ToTimedelta().total_seconds() or self._ttl_s
        held.expires = self._clock() + self._ttl_s
        return reply

    @staticmethod
    def _apply(held: _Held, give_back: ratelimit_pb2.Allowance,
               request: ratelimit_pb2.LeaseRequest, sign: int) -> None:
        held.requests += sign * give_back.requests
        held.input_tokens += sign * give_back.input_tokens
        held.output_tokens += sign * give_back.output_tokens
        held.slots += sign * give_back.slots
        held.used_input += sign * request.used_input_tokens
        held.used_output += sign * request.used_output_tokens

    async def _call(self, tenant: str,
                    request: ratelimit_pb2.LeaseRequest) -> ratelimit_pb2.LeaseResponse:
        endpoints = self._directory.endpoints("ratelimit")
        if not endpoints:
            raise errors.Unavailable("no ratelimit replica is registered", retry_after_s=1.0)
        stub = ratelimit_pb2_grpc.RateLimitStub(
            self._directory.channel_to(rendezvous_owner(tenant, endpoints)))
        try:
            return await stub.Lease(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            error = status.from_rpc_error(exc)
            if isinstance(error, errors.Unavailable | errors.DeadlineExceeded | errors.Internal):
                raise errors.Unavailable(f"quota service: {error.message}",
                                         retry_after_s=1.0) from exc
            raise error from exc

    async def _renew(self, tenant: str, give_back_all: bool = False) -> None:
        held = self._held[tenant]
        async with held.lock:
            await self._lease(tenant, held, give_back_all=give_back_all)
        if not (held.slots or held.slots_in_use or held.used_input or held.used_output
                or held.requests or held.input_tokens or held.output_tokens):
            self._held.pop(tenant, None)  # nothing held, nothing to report: stop renewing

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            for tenant in list(self._held):
                try:
                    await self._renew(tenant)
                except errors.MeshError as exc:
                    log.warning("quota_lease_renewal_failed", tenant=tenant, error=exc.message)


def _chunk(per_minute: int) -> int:
    return max(1, int(bucket_capacity(per_minute) * LEASE_FRACTION))
