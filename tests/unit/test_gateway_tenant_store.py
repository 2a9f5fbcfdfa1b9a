"""The per-tenant bounded store's eviction rules: TTL, per-tenant entries and bytes, a global
byte budget where the largest tenant gives way, replaced entries, and identity-checked growth."""

from __future__ import annotations

from services.gateway.tenant_store import TenantBoundedStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock | None = None, ttl_s: float = 60.0, max_entries_per_tenant: int = 100,
          max_tenant_bytes: int = 1_000, max_bytes: int = 10_000) -> TenantBoundedStore[str]:
    return TenantBoundedStore(ttl_s, max_entries_per_tenant, max_tenant_bytes, max_bytes,
                              clock or Clock())


def test_entries_expire_after_the_ttl_oldest_first():
    clock = Clock()
    held = store(clock, ttl_s=10.0)
    held.put("a", "old", "1", 10)
    clock.now = 5.0
    held.put("b", "new", "2", 20)
    clock.now = 10.0
    assert held.get("a", "old") is None and held.get("b", "new") == "2"
    assert held.bytes == 20 and held.entries("a") == 0
    clock.now = 15.0
    assert held.get("b", "new") is None and held.bytes == 0


def test_past_its_entry_count_a_tenant_loses_its_own_oldest_entry_only():
    held = store(max_entries_per_tenant=2)
    held.put("b", "k", "other", 10)
    for key in ("k1", "k2", "k3"):
        held.put("a", key, key, 10)
    assert [held.get("a", k) for k in ("k1", "k2", "k3")] == [None, "k2", "k3"]
    assert held.get("b", "k") == "other" and held.entries("a") == 2 and held.bytes == 30


def test_past_its_bytes_a_tenant_loses_its_own_oldest_entries_only():
    held = store(max_tenant_bytes=100)
    held.put("b", "k", "other", 90)
    held.put("a", "k1", "1", 60)
    held.put("a", "k2", "2", 30)
    held.put("a", "k3", "3", 50)
    assert [held.get("a", k) for k in ("k1", "k2", "k3")] == [None, "2", "3"]
    assert held.get("b", "k") == "other" and held.bytes == 170


def test_past_the_global_budget_the_largest_tenant_gives_way_and_the_caller_on_a_tie():
    held = store(max_tenant_bytes=1_000, max_bytes=300)
    held.put("big", "b1", "b1", 100)
    held.put("big", "b2", "b2", 100)
    held.put("small", "s1", "s1", 50)
    held.put("small", "s2", "s2", 60)  # 310 bytes: "big" holds the most and loses its oldest
    assert held.get("big", "b1") is None and held.get("big", "b2") == "b2"
    assert held.get("small", "s1") == "s1" and held.bytes == 210


def test_on_a_tie_for_the_largest_the_caller_gives_way():
    held = store(max_tenant_bytes=1_000, max_bytes=290)
    held.put("x", "x1", "x1", 150)
    held.put("y", "y1", "y1", 100)
    held.put("y", "y2", "y2", 40)
    held.put("y", "y3", "y3", 10)  # 300 bytes, 150 each: "y" put last and loses its oldest
    assert held.get("x", "x1") == "x1" and held.get("y", "y1") is None
    assert held.bytes == 200


def test_a_replaced_entry_is_forgotten_and_the_new_one_is_youngest():
    held = store(max_entries_per_tenant=2)
    held.put("a", "k1", "first", 10)
    held.put("a", "k2", "2", 10)
    held.put("a", "k1", "second", 30)
    assert held.get("a", "k1") == "second" and held.bytes == 40 and held.entries("a") == 2
    held.put("a", "k3", "3", 10)  # k2 is now the oldest
    assert held.get("a", "k2") is None and held.get("a", "k1") == "second"


def test_growth_and_removal_touch_only_the_value_still_held():
    held = store(max_tenant_bytes=100)
    first, second = "first", "second"
    held.put("a", "k", first, 10)
    held.grow("a", "k", first, 20)
    assert held.bytes == 30
    held.put("a", "k", second, 10)
    held.grow("a", "k", first, 50)  # the replaced value is no longer counted
    held.remove("a", "k", first)
    assert held.get("a", "k") is second and held.bytes == 10
    held.grow("a", "k", second, 95)  # past the tenant's share: the entry itself goes
    assert held.get("a", "k") is None and held.bytes == 0 and held.entries("a") == 0
    held.put("a", "k", second, 10)
    held.remove("a", "k", second)
    assert held.get("a", "k") is None and held.bytes == 0


def test_past_the_global_budget_an_unevictable_entry_stays_and_the_next_largest_gives_way():
    """A running generation's entry (unevictable) outlives another tenant's pressure."""
    held = TenantBoundedStore(60.0, 100, 1_000, 100, Clock(),
                              evictable=lambda value: not value.startswith("running"))
    held.put("a", "k1", "running-1", 60)
    held.put("b", "k1", "done-1", 30)
    held.put("c", "k1", "done-2", 20)  # 110 > 100: "a" is largest but runs, "b" gives way
    assert held.get("a", "k1") == "running-1" and held.get("b", "k1") is None
    assert held.bytes == 80
    held.put("c", "k2", "running-2", 50)  # 130: "a" and "c" hold only running entries
    assert held.get("a", "k1") == "running-1" and held.get("c", "k1") is None
    assert held.get("c", "k2") == "running-2" and held.bytes == 110  # over until they finish
