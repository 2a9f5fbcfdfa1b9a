"""Stopping a task that loses its cancellation, as one inside aetcd's watch set-up can."""

import asyncio

from services.common.tasks import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again():
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.append(True)  # what Python 3.11's wait_for can do to its caller
        await asyncio.sleep(60)  # ... and on it goes, until cancelled once more

    async def failing() -> None:
        raise RuntimeError("already broken")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(*tasks, recancel_s=0.05)
    assert swallowed == [True]
    assert tasks[0].cancelled() and isinstance(tasks[1].exception(), RuntimeError)
