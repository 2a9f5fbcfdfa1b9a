import pytest

from services.common import errors
from services.scheduler.routing import ReplicaInfo, Router


def replica(rid, models=("m",), healthy=True):
    return ReplicaInfo(rid, f"{rid}:1", models=frozenset(models), healthy=healthy)


def test_least_in_flight_wins_and_release_rebalances():
    router = Router()
    replicas = [replica("a"), replica("b")]
    first = router.route(replicas, "m", now=0, hold_s=10)
    second = router.route(replicas, "m", now=0, hold_s=10)
    assert {first.replica.replica_id, second.replica.replica_id} == {"a", "b"}
    assert router.release(first.reservation_id)
    assert router.route(replicas, "m", now=0, hold_s=10).replica == first.replica


def test_only_healthy_replicas_with_the_model():
    router = Router()
    replicas = [replica("a", healthy=False), replica("b", models=("other",)), replica("c")]
    assert router.route(replicas, "m", 0, 10).replica.replica_id == "c"
    with pytest.raises(errors.Unavailable):
        router.route(replicas, "m", 0, 10, exclude=["c"])
    with pytest.raises(errors.Unavailable):
        router.route([], "m", 0, 10)


def test_reservations_expire():
    router = Router()
    router.route([replica("a")], "m", now=0, hold_s=5)
    assert router.in_flight() == {"a": 1}
    router.route([replica("a")], "m", now=6, hold_s=5)
    assert router.in_flight() == {"a": 1}
