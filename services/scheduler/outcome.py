"""How a routed generation ended: the one definition is `services.common.outcome` (the gateways
judge their own fallback routes by it too); re-exported here for the scheduler's modules."""

from __future__ import annotations

from services.common.outcome import Outcome

__all__ = ["Outcome"]
