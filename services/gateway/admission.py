"""Fair admission to the engines: bounded per-tenant queues in front of a fixed number of running
generations per gateway.

- Between priority classes (premium, standard, free, batch): strict order, with aging — every
  `aging_s` an entry waits lifts it one class, so nothing starves.
- Within a class: the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
  Models", OSDI '24). Each tenant's counter grows by the tokens it is served; the tenant with the
  smallest counter goes next; a tenant that becomes backlogged is lifted to the smallest counter
  among the backlogged, so idle time is not banked into a later burst.
- Bounded: at most `max_queued_per_tenant` per tenant and `max_queued` in all. When full, an
  arrival of a better class evicts the newest entry of the worst class queued (batch and free
  first, paying interactive traffic last); otherwise the arrival is refused. Refusals are cheap:
  no network, no engine.
- Each entry leaves the queue at its deadline or after `max_wait_s`, whichever is first.

The only asyncio here is the futures waiters sleep on; no gRPC, no etcd.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from services.common import errors
from services.common.tenancy import PRIORITY_CLASSES

RUNNING = Gauge("infermesh_gateway_running", "Generations running through this gateway.")
QUEUED = Gauge("infermesh_gateway_queued", "Generations waiting for a place, by tenant.",
               ["tenant"])
SHED = Counter("infermesh_gateway_shed_total",
               "Generations refused by quota or admission, by reason.", ["tenant", "reason"])
ADMITTED = Counter("infermesh_gateway_admitted_total", "Generations given a place to run.",
                   ["tenant"])
WAIT = Histogram("infermesh_gateway_admission_wait_seconds",
                 "Time a generation waited for a place to run.", ["tenant"],
                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


@dataclass(frozen=True)
class AdmissionLimits:
    max_running: int = 64
    max_queued_per_tenant: int = 32
    max_queued: int = 512
    aging_s: float = 5.0
    max_wait_s: float = 30.0


@dataclass
class Ticket:
    """A running generation's place; give it back with `release`."""

    tenant: str
    cost: int  # tokens charged to the tenant's virtual counter at admission
    queued_s: float = 0.0
    released: bool = False


@dataclass
class _Waiter:
    tenant: str
    priority: int
    cost: int
    enqueued: float
    order: int
    future: asyncio.Future[Ticket] = field(repr=False)


def priority_index(priority_class: str) -> int:
    return PRIORITY_CLASSES.index(priority_class)


class FairAdmission:
    def __init__(self, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._running = 0
        self._queues: dict[str, collections.deque[_Waiter]] = {}
        self._counters: dict[str, float] = collections.defaultdict(float)
        self._queued = 0
        self._order = itertools.count()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._queued

    def queued_for(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    async def admit(self, tenant: str, priority: int, cost: int, timeout_s: float) -> Ticket:
        """Waits for a place to run, at most `timeout_s` (the request's remaining deadline) and
        `max_wait_s`. Raises ResourceExhausted (reason queue_full, shed or overload)."""
        try:
            ticket = await self._admit(tenant, priority, cost, timeout_s)
            ADMITTED.labels(tenant).inc()
            WAIT.labels(tenant).observe(ticket.queued_s)
            return ticket
        except errors.ResourceExhausted as exc:
            SHED.labels(tenant, exc.reason).inc()
            raise
        finally:
            RUNNING.set(self._running)
            QUEUED.labels(tenant).set(self.queued_for(tenant))

    async def _admit(self, tenant: str, priority: int, cost: int, timeout_s: float) -> Ticket:
        if self._running < self.limits.max_running and not self._queued:
            return self._start(tenant, cost, 0.0)
        self._make_room(tenant, priority)
        now = self._clock()
        waiter = _Waiter(tenant, priority, cost, now, next(self._order),
                         asyncio.get_running_loop().create_future())
        queue = self._queues.setdefault(tenant, collections.deque())
        if not queue:
            backlogged = [self._counters[t] for t, q in self._queues.items() if q and t != tenant]
            if backlogged:
                self._counters[tenant] = max(self._counters[tenant], min(backlogged))
        queue.append(waiter)
        self._queued += 1
        self._dispatch()
        wait_s = min(timeout_s, self.limits.max_wait_s)
        try:
            async with asyncio.timeout(wait_s):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.exception():
                return waiter.future.result()  # admitted at the last moment
            self._remove(waiter)
            raise errors.ResourceExhausted(
                f"overloaded: no room to run within {wait_s:.1f}s", reason="overload",
                retry_after_s=1.0) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() \
                    and not waiter.future.exception():
                self.release(waiter.future.result(), used_tokens=0)
            else:
                self._remove(waiter)
            raise

    def release(self, ticket: Ticket, used_tokens: int) -> None:
        """Frees the place and corrects the tenant's counter to the tokens really served."""
        if ticket.released:
            return
        ticket.released = True
        self._running -= 1
        self._counters[ticket.tenant] += used_tokens - ticket.cost
        self._dispatch()
        RUNNING.set(self._running)

    def _start(self, tenant: str, cost: int, queued_s: float) -> Ticket:
        self._running += 1
        self._counters[tenant] += cost
        return Ticket(tenant, cost, queued_s)

    def _make_room(self, tenant: str, priority: int) -> None:
        if len(self._queues.get(tenant, ())) >= self.limits.max_queued_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant {tenant!r} already has {self.limits.max_queued_per_tenant} requests "
                "queued", reason="queue_full", retry_after_s=0.5)
        if self._queued < self.limits.max_queued:
            return
        worst = max((w for q in self._queues.values() for w in q),
                    key=lambda w: (w.priority, w.order))
        if worst.priority <= priority:
            raise errors.ResourceExhausted("the gateway's queue is full", reason="queue_full",
                                           retry_after_s=0.5)
        self._remove(worst)
        worst.future.set_exception(errors.ResourceExhausted(
            f"shed for higher-priority work ({PRIORITY_CLASSES[worst.priority]} goes first)",
            reason="shed", retry_after_s=1.0))

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._queued -= 1

    def _dispatch(self) -> None:
        now = self._clock()
        while self._running < self.limits.max_running and self._queued:
            heads = [q[0] for q in self._queues.values() if q]
            waiter = min(heads, key=lambda w: (
                max(0, w.priority - int((now - w.enqueued) / self.limits.aging_s)),
                self._counters[w.tenant], w.order))
            self._queues[waiter.tenant].popleft()
            self._queued -= 1
            if waiter.future.done():  # its caller gave up (timeout or cancel) just now
                continue
            waiter.future.set_result(self._start(waiter.tenant, waiter.cost, now - waiter.enqueued))
