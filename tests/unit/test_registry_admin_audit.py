"""The registry's admin audit shipper: events bounded, batches cut by bytes, and an event the
auditor refuses moved to the dead letters (one etcd transaction) while the next ones ship."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY

from services.common import etcd
from services.registry.admin_audit import (
    DEAD_LETTER_PREFIX,
    AdminAuditShipper,
    cut_batches,
    to_event,
)
from tests.unit.test_gateway_audit_shipping import auditor  # noqa: F401 (a fixture)


def record(n: int, request_id: str = "", **overrides: Any) -> dict[str, Any]:
    return {"event_id": f"registry:m:{n}", "time": 1_700_000_000.0 + n, "source": "registry/t",
            "actor": "key:admin", "action": "registry.set_alias", "target": f"m@{n}",
            "before_json": "{}", "after_json": "{}", "reason": "", **overrides}


class FakeEtcd:
    """What the shipper calls on its client: deletes and one kind of transaction."""

    def __init__(self) -> None:
        self.deleted: list[bytes] = []
        self.moved: list[bytes] = []
        self.transactions = SimpleNamespace(put=lambda key, value: ("put", key),
                                            delete=lambda key: ("delete", key))

    async def delete(self, key: bytes) -> None:
        self.deleted.append(key)

    async def transaction(self, compare, success, failure):
        self.moved += [key for op, key in success if op == "put"]
        self.deleted += [key for op, key in success if op == "delete"]
        return True, []


def test_events_are_bounded_and_batches_cut_by_bytes() -> None:
    big = to_event(record(1, after_json="x" * 500_000, reason="r" * 9000))
    assert sorted(big.truncated) == ["admin.after_json", "admin.reason"]
    assert big.ByteSize() < 24_000
    events = [(str(n), to_event(record(n, after_json="y" * 10_000))) for n in range(50)]
    batches = cut_batches(events, max_events=256, max_bytes=64 << 10)
    assert [item for batch in batches for item in batch] == events
    assert all(sum(e.ByteSize() for _, e in batch) <= 64 << 10 for batch in batches)
    assert len(batches) > 5


async def test_a_refused_event_is_dead_lettered_and_the_next_ship(auditor) -> None:  # noqa: F811
    fake, directory = auditor
    client = FakeEtcd()
    shipper = AdminAuditShipper(client, directory, timeout_s=5.0)  # type: ignore[arg-type]
    records = {f"registry:m:{n}": record(n) for n in range(6)}
    shipper._outbox = SimpleNamespace(items=records)  # type: ignore[assignment]
    poisoned = to_event(records["registry:m:2"])
    poisoned.request_id = "poison"
    events = [(key, to_event(r)) for key, r in records.items()]
    events[2] = ("registry:m:2", poisoned)
    before = REGISTRY.get_sample_value("infermesh_registry_audit_dead_lettered_total",
                                       {"reason": "refused"}) or 0.0
    assert await shipper._ship(events)
    assert fake.stored == [f"registry:m:{n}" for n in range(6) if n != 2]
    assert client.moved == [(DEAD_LETTER_PREFIX + "registry:m:2").encode()]
    assert sorted(client.deleted) == sorted(
        etcd.Keys.registry_audit_event(key).encode() for key in records)
    assert REGISTRY.get_sample_value("infermesh_registry_audit_dead_lettered_total",
                                     {"reason": "refused"}) == before + 1
