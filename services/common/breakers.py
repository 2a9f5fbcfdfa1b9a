"""A circuit breaker's state machine, pure logic with the time passed in: the scheduler keeps one
per replica and zone, and each gateway one per replica for the routes it makes on its own when no
scheduler answers (`services/gateway/fallback.py`).

    closed ──(N consecutive failures, or error rate over the window)──▶ open
    open ──(cool-down passed)──▶ half-open: one probe request at a time
    half-open ──probe ok──▶ closed        half-open ──probe failed──▶ open (cool-down again)

A probe's verdict comes with its outcome, which for a long generation can be minutes away: a probe
not judged within `probe_timeout_s` is taken as lost and another is let through. Transitions are
logged; whoever owns the breaker counts them through `on_move`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.common.logs import get_logger

log = get_logger(__name__)

__all__ = ["BreakerSettings", "BreakerState", "CircuitBreaker", "OnMove"]


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


OnMove = Callable[["CircuitBreaker", BreakerState], None]


class CircuitBreaker:
    def __init__(
        self, scope: str, name: str, settings: BreakerSettings,
        not_closed: set[str] | None = None, on_move: OnMove | None = None,
    ):
        """`not_closed`: a set shared by a family of breakers, holding the names of those open or
        half-open (kept up to date here); `on_move(breaker, new_state)` after each transition."""
        self.scope = scope
        self._on_move = on_move
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
        if self._on_move is not None:
            self._on_move(self, state)
