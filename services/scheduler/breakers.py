"""Circuit breakers per replica and per zone, fed by the outcomes gateways report on Release.

    closed ──(N consecutive failures, or error rate over the window)──▶ open
    open ──(cool-down passed)──▶ half-open: one probe request at a time
    half-open ──probe ok──▶ closed        half-open ──probe failed──▶ open (cool-down again)

A probe's verdict comes with its Release, which for a long generation (or a gateway that died)
can be minutes away: a probe not judged within `probe_timeout_s` is taken as lost and another
is let through, so a half-open breaker — for a zone, every replica in it — never waits on one.

A zone's breaker opens when most of the zone's replicas have their own breaker open or
half-open (a zone-wide fault: network, power, a bad rollout there); it then probes and closes
like a replica's. Pure logic with the time passed in; one breaker's state machine is
`services.common.breakers.CircuitBreaker`; transitions are logged there and counted here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from services.common.breakers import BreakerSettings, BreakerState, CircuitBreaker
from services.scheduler.outcome import Outcome

TRANSITIONS = Counter(
    "infermesh_scheduler_breaker_transitions_total", "Circuit breaker state changes.",
    ["scope", "name", "state"],
)
NOT_CLOSED = Gauge(
    "infermesh_scheduler_breaker_open", "1 while a breaker is open or half-open.", ["scope", "name"]
)

__all__ = ["NO_PROBES", "BreakerSettings", "BreakerState", "Breakers", "CircuitBreaker", "Probes"]


def _count_move(breaker: CircuitBreaker, state: BreakerState) -> None:
    TRANSITIONS.labels(breaker.scope, breaker.name, state.value).inc()
    NOT_CLOSED.labels(breaker.scope, breaker.name).set(int(state is not BreakerState.CLOSED))


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
                "replica", replica_id, self._settings, self.replicas_not_closed, _count_move)
        return breaker

    def zone(self, zone: str) -> CircuitBreaker:
        breaker = self._zones.get(zone)
        if breaker is None:
            breaker = self._zones[zone] = CircuitBreaker(
                "zone", zone, self._settings, self.zones_not_closed, _count_move)
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
