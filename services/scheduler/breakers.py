"""Circuit breakers per replica and per zone, fed by the outcomes gateways report on Release.

    closed ──(N consecutive failures, or error rate over the window)──▶ open
    open ──(cool-down passed)──▶ half-open: one probe request at a time
    half-open ──probe ok──▶ closed        half-open ──probe failed──▶ open (cool-down again)

A probe's verdict comes with its Release, which for a long generation (or a gateway that died)
can be minutes away: a probe not judged within `probe_timeout_s` is taken as lost and another
is let through, so a half-open breaker — for a zone, every replica in it — never waits on one.

A zone's breaker opens when most of the zone's replicas have their own breaker open or
half-open (a zone-wide fault: network, power, a bad rollout there); it then probes and closes
like a replica's. Pure logic with the time passed in; transitions are logged and counted.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from services.common.logs import get_logger
from services.scheduler.outcome import Outcome

log = get_logger(__name__)

TRANSITIONS = Counter(
    "infermesh_scheduler_breaker_transitions_total", "Circuit breaker state changes.",
    ["scope", "name", "state"],
)
NOT_CLOSED = Gauge(
    "infermesh_scheduler_breaker_open", "1 while a breaker is open or half-open.", ["scope", "name"]
)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    consecutive_failures: int = 5  # this many failures in a row open the breaker
    error_rate: float = 0.5  # or a failed share above this, over the window ...
    min_requests: int = 10  # ... once the window holds at least this many outcomes
    window_s: float = 30.0
    cooldown_s: float = 5.0  # open this long before a probe is let through
    probe_timeout_s: float = 5.0  # a probe not judged by then is lost: another may go
    zone_failing_fraction: float = 0.5  # a zone opens when more of its replicas than this fail


class CircuitBreaker:
    def __init__(
        self, scope: str, name: str, settings: BreakerSettings,
        not_closed: set[str] | None = None,
    ):
        self.scope = scope
        self.name = name
        self._settings = settings
        self._not_closed = set() if not_closed is None else not_closed  # shared, kept up to date
        self.state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probe_out = False
        self._probe_until = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._window_failures = 0

    def available(self, now: float) -> bool:
        """Whether a request may be routed here now (moves open → half-open after cool-down)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now < self._opened_at + self._settings.cooldown_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        if self._probe_out and now >= self._probe_until:
            self._probe_out = False  # its verdict is taking too long: try another probe
        return not self._probe_out

    def routed(self, now: float) -> bool:
        """Called when a request was routed here; True if it is the half-open breaker's probe."""
        if self.state is BreakerState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            self._probe_until = now + self._settings.probe_timeout_s
            return True
        return False

    def probe_lost(self) -> None:
        """The probe ended without a verdict (cancelled, expired): let another through."""
        self._probe_out = False

    def record(self, failed: bool, now: float, probe: bool = False) -> None:
        """Folds in one judged outcome. Only a probe's outcome moves a half-open breaker."""
        self._remember(failed, now)
        if self.state is BreakerState.HALF_OPEN:
            if probe:
                self._probe_out = False
                if failed:
                    self.trip(now)
                else:
                    self._reset()
                    self._move(BreakerState.CLOSED)
            return
        if self.state is BreakerState.OPEN:
            return  # late outcomes of requests routed before it opened
        self._consecutive = self._consecutive + 1 if failed else 0
        if self._consecutive >= self._settings.consecutive_failures or (
            len(self._window) >= self._settings.min_requests
            and self._window_failures / len(self._window) > self._settings.error_rate
        ):
            self.trip(now)

    def trip(self, now: float) -> None:
        self._opened_at = now
        self._probe_out = False
        self._move(BreakerState.OPEN)

    def _remember(self, failed: bool, now: float) -> None:
        self._window.append((now, failed))
        self._window_failures += failed
        horizon = now - self._settings.window_s
        while self._window and self._window[0][0] < horizon:
            self._window_failures -= self._window.popleft()[1]

    def _reset(self) -> None:
        self._consecutive = 0
        self._window.clear()
        self._window_failures = 0

    def _move(self, state: BreakerState) -> None:
        if state is self.state:
            return
        log.warning("breaker_" + state.value, scope=self.scope, name=self.name,
                    previous=self.state.value)
        self.state = state
        if state is BreakerState.CLOSED:
            self._not_closed.discard(self.name)
        else:
            self._not_closed.add(self.name)
        TRANSITIONS.labels(self.scope, self.name, state.value).inc()
        NOT_CLOSED.labels(self.scope, self.name).set(int(state is not BreakerState.CLOSED))


@dataclass(frozen=True)
class Probes:
    """Which breakers a routed request is the probe of (its outcome decides them)."""

    replica: bool = False
    zone: bool = False


NO_PROBES = Probes()


class Breakers:
    """Every replica's and zone's breaker, created on first use. A replica with no zone ("")
    has no zone breaker."""

    def __init__(self, settings: BreakerSettings):
        self._settings = settings
        self._replicas: dict[str, CircuitBreaker] = {}
        self._zones: dict[str, CircuitBreaker] = {}
        # Names whose breaker is open or half-open: routing checks only these.
        self.replicas_not_closed: set[str] = set()
        self.zones_not_closed: set[str] = set()

    def replica(self, replica_id: str) -> CircuitBreaker:
        breaker = self._replicas.get(replica_id)
        if breaker is None:
            breaker = self._replicas[replica_id] = CircuitBreaker(
                "replica", replica_id, self._settings, self.replicas_not_closed)
        return breaker

    def zone(self, zone: str) -> CircuitBreaker:
        breaker = self._zones.get(zone)
        if breaker is None:
            breaker = self._zones[zone] = CircuitBreaker(
                "zone", zone, self._settings, self.zones_not_closed)
        return breaker

    def state(self, replica_id: str) -> BreakerState:
        breaker = self._replicas.get(replica_id)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def zone_state(self, zone: str) -> BreakerState:
        breaker = self._zones.get(zone)
        return BreakerState.CLOSED if breaker is None or not zone else breaker.state

    def available(self, replica_id: str, zone: str, now: float) -> bool:
        if replica_id in self.replicas_not_closed and not self._replicas[replica_id].available(now):
            return False
        return zone not in self.zones_not_closed or self._zones[zone].available(now)

    def routed(self, replica_id: str, zone: str, now: float) -> Probes:
        replica = self._replicas.get(replica_id)
        zone_breaker = self._zones.get(zone) if zone else None
        replica_probe = replica is not None and replica.routed(now)
        zone_probe = zone_breaker is not None and zone_breaker.routed(now)
        return Probes(replica_probe, zone_probe) if replica_probe or zone_probe else NO_PROBES

    def record(
        self, replica_id: str, zone: str, outcome: Outcome, probes: Probes, now: float,
        zone_members: Collection[str],
    ) -> None:
        """Folds a released route's outcome into its replica's and zone's breakers.

        `zone_members`: the replica ids currently in `zone`, to judge whether most are failing.
        """
        if not outcome.judges:
            if probes.replica:
                self.replica(replica_id).probe_lost()
            if probes.zone:
                self.zone(zone).probe_lost()
            return
        replica = self.replica(replica_id)
        was_closed = replica.state is BreakerState.CLOSED
        replica.record(outcome.failed, now, probes.replica)
        if not zone:
            return
        zone_breaker = self.zone(zone)
        if probes.zone:  # a closed zone breaker opens by its members' breakers, not by count
            zone_breaker.record(outcome.failed, now, probe=True)
        if (was_closed and replica.state is BreakerState.OPEN
                and zone_breaker.state is BreakerState.CLOSED):
            failing = sum(self.state(member) is not BreakerState.CLOSED for member in zone_members)
            if zone_members and failing / len(zone_members) > self._settings.zone_failing_fraction:
                zone_breaker.trip(now)
