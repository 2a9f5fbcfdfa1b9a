"""The etcd records' codecs: what a writer encodes, every reader decodes to the same value."""

from __future__ import annotations

import pytest

from services.common.records import KvGeometry, ReplicaRecord
from services.scheduler.inventory import ReplicaInfo
from services.scheduler.placement import ReplicaState

RECORD = ReplicaRecord(
    replica_id="r1", grpc_endpoint="10.0.0.1:8001", metrics_endpoint="10.0.0.1:8002",
    zone="zone-a", gpu_type="H100", gpu_memory_mib=81_920,
    models=frozenset({"chat-0123456789ab"}), versions={"chat-0123456789ab": "1"},
    version_ids={"chat-0123456789ab": "sha256:" + "0" * 64},
    kv={"chat-0123456789ab": KvGeometry(256, 32)},
    capacity={"chat-0123456789ab": (9000.0, 400.0)},
    ready=True, healthy=True, draining=False, placement_errors={"chat-ffffffffffff": "boom"},
)


def test_a_replica_record_round_trips_and_both_scheduler_views_agree():
    raw = RECORD.encode()
    assert ReplicaRecord.decode(raw) == RECORD
    info, state = ReplicaInfo.from_record(raw), ReplicaState.from_record(raw)
    assert info.models == state.loaded == RECORD.models
    assert info.healthy and state.healthy and not info.draining and not state.draining
    assert info.kv == RECORD.kv and state.capacity == RECORD.capacity
    assert state.failed == {"chat-ffffffffffff"}


def test_unknown_counts_read_as_unknown_and_a_malformed_record_names_the_field():
    raw = RECORD.encode() | {"gpu_memory_mib": -1, "kv": {"m": {"max_blocks": "many"}},
                             "capacity": {"m": {"prefill_tokens_per_s": 0}}}
    record = ReplicaRecord.decode(raw)
    assert record.gpu_memory_mib == 0 and record.kv == {"m": KvGeometry(None, None)}
    assert record.capacity == {}
    for change, field in [({"schema": 2}, "schema"), ({"replica_id": ""}, "replica_id"),
                          ({"grpc_endpoint": 5}, "grpc_endpoint"), ({"models": "m"}, "models"),
                          ({"placement_errors": []}, "placement_errors")]:
        with pytest.raises(ValueError, match=field):
            ReplicaRecord.decode(RECORD.encode() | change)
