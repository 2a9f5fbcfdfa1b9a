import asyncio

import pytest

from services.common import errors
from services.gateway.admission import AdmissionLimits, FairAdmission

PREMIUM, STANDARD, FREE, BATCH = range(4)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def queued(admission: FairAdmission, n: int) -> None:
    for _ in range(100):
        if admission.queued == n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"queued={admission.queued}, want {n}")


async def settle() -> None:
    """Lets woken waiters run (a few loop turns: shield, wait_for, the task)."""
    for _ in range(10):
        await asyncio.sleep(0)


def start(admission, tenant, priority=STANDARD, cost=10, timeout=5.0):
    return asyncio.ensure_future(admission.admit(tenant, priority, cost, timeout))


async def test_runs_at_once_under_capacity_and_queues_above():
    admission = FairAdmission(AdmissionLimits(max_running=2))
    a = await admission.admit("a", STANDARD, 10, 1.0)
    await admission.admit("a", STANDARD, 10, 1.0)
    third = start(admission, "a")
    await queued(admission, 1)
    assert not third.done()
    admission.release(a, used_tokens=10)
    ticket = await third
    assert ticket.tenant == "a" and admission.running == 2


async def test_a_quiet_tenant_is_not_stuck_behind_a_burst():
    admission = FairAdmission(AdmissionLimits(max_running=1))
    running = await admission.admit("noisy", STANDARD, 100, 1.0)
    burst = [start(admission, "noisy", cost=100) for _ in range(5)]
    await queued(admission, 5)
    quiet = start(admission, "quiet", cost=100)
    await queued(admission, 6)
    admission.release(running, used_tokens=100)
    await settle()
    assert burst[0].done()  # the noisy tenant's counter was lower: it had the first turn
    admission.release(burst[0].result(), used_tokens=100)
    await settle()
    assert quiet.done() and not burst[1].done()  # then the quiet one, not four more of noisy
    for task in burst[1:]:
        task.cancel()
    await asyncio.gather(*burst[1:], return_exceptions=True)
    assert admission.queued == 0


async def test_strict_priority_with_aging():
    clock = Clock()
    admission = FairAdmission(AdmissionLimits(max_running=1, aging_s=10.0), clock)
    running = await admission.admit("x", STANDARD, 1, 1.0)
    batch = start(admission, "b", BATCH)
    premium = start(admission, "p", PREMIUM)
    await queued(admission, 2)
    admission.release(running, 1)
    await settle()
    assert premium.done() and not batch.done()
    # The batch entry has waited 30 s: aged three classes, it now ranks with premium and its
    # earlier arrival wins over a new premium request.
    clock.now = 30.0
    late_premium = start(admission, "p2", PREMIUM)
    await queued(admission, 2)
    admission.release(premium.result(), 1)
    await settle()
    assert batch.done() and not late_premium.done()
    late_premium.cancel()
    await asyncio.gather(late_premium, return_exceptions=True)


async def test_bounded_queues_shed_batch_before_paying_traffic():
    admission = FairAdmission(AdmissionLimits(max_running=1, max_queued_per_tenant=2, max_queued=3))
    await admission.admit("x", STANDARD, 1, 1.0)
    a1, a2 = start(admission, "a"), start(admission, "a")
    await queued(admission, 2)
    with pytest.raises(errors.ResourceExhausted) as raised:
        await admission.admit("a", STANDARD, 1, 1.0)
    assert raised.value.reason == "queue_full"
    batch = start(admission, "b", BATCH)
    await queued(admission, 3)
    premium = start(admission, "p", PREMIUM)  # full: the batch entry makes room
    await queued(admission, 3)
    with pytest.raises(errors.ResourceExhausted) as raised:
        await batch
    assert raised.value.reason == "shed"
    with pytest.raises(errors.ResourceExhausted) as raised:
        await admission.admit("c", BATCH, 1, 1.0)  # full of better work: refused outright
    assert raised.value.reason == "queue_full"
    for task in (a1, a2, premium):
        task.cancel()
    await asyncio.gather(a1, a2, premium, return_exceptions=True)
    assert admission.queued == 0


async def test_waiting_past_the_deadline_is_overload_and_cancel_leaves_no_trace():
    admission = FairAdmission(AdmissionLimits(max_running=1))
    ticket = await admission.admit("x", STANDARD, 1, 1.0)
    with pytest.raises(errors.ResourceExhausted) as raised:
        await admission.admit("y", STANDARD, 1, timeout_s=0.05)
    assert raised.value.reason == "overload" and raised.value.retry_after_s
    waiting = start(admission, "z")
    await queued(admission, 1)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert admission.queued == 0
    admission.release(ticket, 1)
    admission.release(ticket, 1)  # idempotent
    assert admission.running == 0
