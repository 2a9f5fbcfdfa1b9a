"""When the client retries a refused generation by itself, and how long it may wait."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from infermesh_client._errors import InfermeshError

RETRYABLE_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of refusals that carry the server's `RetryInfo` delay, after that delay.

    A refusal comes before any text, so a retry can neither duplicate output nor, with the
    idempotency key the client sets once per logical call, run or charge a generation twice.
    Nothing is retried once text has arrived, nor an error without a delay from the server.
    """

    max_attempts: int = 4  # the first try included; 1 turns retries off
    max_wait: float = 30.0  # seconds of server-asked waiting, in all, per logical call
    max_delay: float = 20.0  # a single delay longer than this is not waited for

    def delay(
        self, error: InfermeshError, attempt: int, waited: float, remaining: Optional[float],
    ) -> Optional[float]:
        """Seconds to wait before attempt `attempt + 1`, or None to raise `error` now.

        `attempt` counts from 1, `waited` is what this call already waited, `remaining` the
        seconds left before its deadline (None: no deadline)."""
        delay = error.retry_after
        if error.code not in RETRYABLE_CODES or delay is None:
            return None
        if attempt >= self.max_attempts or delay > self.max_delay:
            return None
        if waited + delay > self.max_wait:
            return None
        if remaining is not None and delay >= remaining:
            return None  # the retry could not finish in time: the refusal is the answer
        return max(delay, 0.0)


NO_RETRIES = RetryPolicy(max_attempts=1)
