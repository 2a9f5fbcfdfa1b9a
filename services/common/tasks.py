"""Stopping background tasks for certain."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any], recancel_s: float = 1.0) -> None:
    """Cancels `tasks` and returns once every one has ended (their errors are dropped: a task
    being stopped has nobody left to report to).

    A task can lose its cancellation inside code we do not own: Python 3.11's `asyncio.wait_for`
    returns normally when the cancellation arrives just as the awaited thing completes, and
    aetcd sets up every watch under one. Such a task is cancelled again every `recancel_s`, so
    a stop never hangs on it (a CI run once waited 300 s on a watch cache)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
