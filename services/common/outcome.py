"""How a routed generation ended: the gateway reports it on Release, the breakers judge by it."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    UNREPORTED = "unreported"  # the reservation expired, or an old caller said nothing
    OK = "ok"
    FAILED_BEFORE_FIRST_TOKEN = "failed_before_first_token"
    FAILED_AFTER_FIRST_TOKEN = "failed_after_first_token"
    CANCELLED = "cancelled"  # the client went away: says nothing about the replica

    @property
    def failed(self) -> bool:
        return self in (Outcome.FAILED_BEFORE_FIRST_TOKEN, Outcome.FAILED_AFTER_FIRST_TOKEN)

    @property
    def judges(self) -> bool:
        """Whether the outcome says something about the replica's health."""
        return self in (Outcome.OK, Outcome.FAILED_BEFORE_FIRST_TOKEN,
                        Outcome.FAILED_AFTER_FIRST_TOKEN)
