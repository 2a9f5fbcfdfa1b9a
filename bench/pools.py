"""The load generators' client processes: fresh interpreters, started before any measurement."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time


def _started(hold_s: float) -> None:
    time.sleep(hold_s)  # held, so that every submitted warm-up needs a process of its own


def client_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of `processes` client processes, all running when it is returned.

    Spawned, never forked: by the time a benchmark starts its clients the bench's own process has
    used gRPC, and a forked child inherits gRPC's threads mid-flight (seen: the audit step's
    client aborting with "Check failed: next_worker->state == KICKED"). Started at once, so an
    interpreter's start-up falls in no measured window.
    """
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"))
    for started in [pool.submit(_started, 0.2) for _ in range(processes)]:
        started.result()
    return pool
