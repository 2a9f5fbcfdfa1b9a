"""The registry's admin audit shipper's pure part: events bounded, batches cut by bytes (the
dead letters are tested against a real etcd and auditor in tests/integration)."""

from __future__ import annotations

from typing import Any

from services.registry.admin_audit import cut_batches, to_event


def record(n: int, **overrides: Any) -> dict[str, Any]:
    return {"event_id": f"registry:m:{n}", "time": 1_700_000_000.0 + n, "source": "registry/t",
            "actor": "key:admin", "action": "registry.set_alias", "target": f"m@{n}",
            "before_json": "{}", "after_json": "{}", "reason": "", **overrides}


def test_events_are_bounded_and_batches_cut_by_bytes() -> None:
    big = to_event(record(1, after_json="x" * 500_000, reason="r" * 9000))
    assert sorted(big.truncated) == ["admin.after_json", "admin.reason"]
    assert big.ByteSize() < 24_000
    events = [(str(n), to_event(record(n, after_json="y" * 10_000))) for n in range(50)]
    batches = cut_batches(events, max_events=256, max_bytes=64 << 10)
    assert [item for batch in batches for item in batch] == events
    assert all(sum(e.ByteSize() for _, e in batch) <= 64 << 10 for batch in batches)
    assert len(batches) > 5
