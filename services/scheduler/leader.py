"""Leader election through etcd: one scheduler places models, any scheduler routes.

A candidate grants a lease and creates `scheduler/leader` under it with a create-if-absent
transaction; whoever creates it leads while it keeps the lease alive. Followers watch the key and
campaign again as soon as it is deleted (the leader stepped down or its lease expired), so a lost
leader is replaced within the lease TTL. A leader that lost its lease waits half a TTL before it
campaigns again, so a healthy follower takes over first.

Leadership ends the moment the lease cannot be shown alive: a keepalive that reports the lease
gone, the key deleted, or no successful keepalive for a whole TTL (etcd away: it may already
have expired there). `is_leader` turns false at once, before the next campaign. Writes that only
the leader may make compare the key's create revision (`fence()`), so a leader that lost the key
without noticing yet cannot overwrite its successor's decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aetcd
from prometheus_client import Gauge

from services.common.logs import get_logger
from services.common.tasks import cancel_and_wait

log = get_logger(__name__)
LEADER = Gauge("infermesh_scheduler_leader",
               "1 while this scheduler is the placement leader, else 0.")


class LeaderElection:
    """Campaigns for `key` until `close()`; `is_leader` says whether we hold it right now."""

    def __init__(
        self, client: aetcd.Client, key: str, candidate_id: str, ttl_s: int, timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if ttl_s < 2:
            raise ValueError("ttl_s: must be >= 2 (etcd's minimum lease TTL)")
        self._client = client
        self._key = key.encode()
        self._candidate = candidate_id.encode()
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._create_revision = 0  # of our key while we lead; 0 otherwise
        self._valid_until = 0.0  # our lease is surely alive until then (local clock)
        self._changed = asyncio.Event()  # set on every gain or loss of leadership
        self._task: asyncio.Task[None] | None = None
        LEADER.set(0)

    @property
    def is_leader(self) -> bool:
        return self._create_revision > 0 and self._clock() < self._valid_until

    def fence(self):
        """The transaction comparison that holds only while we still hold the leader key."""
        if not self.is_leader:
            raise RuntimeError("not the leader")
        return self._client.transactions.create(self._key) == self._create_revision

    async def wait_changed(self, timeout_s: float) -> None:
        """Returns when leadership was gained or lost, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        self._changed.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader election")

    async def close(self) -> None:
        """Stops campaigning; a leader deletes its key (revokes the lease) so another takes
        over at once rather than after the TTL."""
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _call(self, coroutine):
        async with asyncio.timeout(self._timeout_s):
            return await coroutine

    async def _run(self) -> None:
        while True:
            lease, lost = None, False
            try:
                lease = await self._call(self._client.lease(self._ttl_s))
                granted_at = self._clock()
                revision = await self._campaign(lease)
                if revision:
                    self._lead(revision, granted_at)
                    await self._hold(lease)
                else:
                    await self._wait_vacant()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd away or slow: not leader, try again shortly
                log.warning("leader_election_failed", error=repr(exc))
                await asyncio.sleep(min(1.0, self._ttl_s / 3))
            finally:
                lost = self._step_down()
                if lease is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._call(lease.revoke()))
            if lost:  # a leader that just lost its lease is suspect: the others go first
                await asyncio.sleep(self._ttl_s / 2)

    async def _campaign(self, lease) -> int:
        """The key's create revision if we created it now, else 0."""
        tx = self._client.transactions
        won, _ = await self._call(self._client.transaction(
            compare=[tx.version(self._key) == 0],
            success=[tx.put(self._key, self._candidate, lease=lease)],
            failure=[],
        ))
        if not won:
            return 0
        held = await self._call(self._client.get(self._key))
        return held.create_revision if held is not None and held.value == self._candidate else 0

    def _lead(self, revision: int, granted_at: float) -> None:
        self._create_revision = revision
        self._valid_until = granted_at + self._ttl_s
        LEADER.set(1)
        self._changed.set()
        log.info("leader_elected", candidate=self._candidate.decode(), revision=revision)

    def _step_down(self) -> bool:
        """Ends our leadership, if we had it; True when we had."""
        if not self._create_revision:
            return False
        log.warning("leadership_lost", candidate=self._candidate.decode())
        self._create_revision = 0
        self._valid_until = 0.0
        LEADER.set(0)
        self._changed.set()
        return True

    async def _hold(self, lease) -> None:
        """Returns when leadership is lost: lease gone, key deleted, or keepalives failing for
        a whole TTL."""
        keepalive = asyncio.create_task(self._keep_alive(lease), name="leader keepalive")
        deleted = asyncio.create_task(self._wait_deleted(self._create_revision),
                                      name="leader key watch")
        try:
            done, _ = await asyncio.wait({keepalive, deleted},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:  # e.g. the watch broke: etcd restarted
                    log.warning("leader_hold_failed", error=repr(task.exception()))
        finally:
            await cancel_and_wait(keepalive, deleted)

    async def _keep_alive(self, lease) -> None:
        while self.is_leader:
            await asyncio.sleep(self._ttl_s / 4)
            sent_at = self._clock()
            try:
                reply = await self._call(lease.refresh())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader_keepalive_failed", error=repr(exc))
                continue  # is_leader ends it once the last good keepalive is a TTL old
            if reply is None or reply.TTL <= 0:
                return
            self._valid_until = sent_at + reply.TTL

    async def _wait_deleted(self, since_revision: int) -> None:
        """Returns when the leader key is deleted after `since_revision` (or the watch fails)."""
        watch = await self._call(self._client.watch(self._key, start_revision=since_revision))
        try:
            async for event in watch:
                if event.kind == "DELETE":
                    return
        finally:
            with contextlib.suppress(Exception):
                await self._call(watch.cancel())

    async def _wait_vacant(self) -> None:
        """As a follower: until the key is deleted, or one TTL (then campaign again anyway,
        in case the watch missed it)."""
        held = await self._call(self._client.get(self._key))
        if held is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ttl_s):
                await self._wait_deleted(held.mod_revision + 1)
