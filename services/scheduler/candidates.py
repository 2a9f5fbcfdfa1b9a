"""The vocabulary routing plugins share: the request being routed, a candidate replica, and the
read-only view a filter or scorer decides from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.scheduler.breakers import Breakers
from services.scheduler.inventory import LoadReport, ModelLoad, ReplicaInfo
from services.scheduler.kv_index import KvIndex
from services.scheduler.prefix_index import PrefixIndex


@dataclass(frozen=True)
class RouteQuery:
    """One request to route, as the gateway described it."""

    model: str  # the Triton model name
    hold_s: float  # the reservation expires after this unless released
    prompt_tokens: int = 0
    prefix_hashes: Sequence[int] = ()  # services/common/prefix.py chain
    # The prompt's token blocks (services/common/kv_blocks.py), in blocks of kv_block_tokens
    kv_block_hashes: Sequence[int] = ()
    kv_block_tokens: int = 0
    zone: str = ""  # the caller's zone: preferred, never required
    exclude: frozenset[str] = frozenset()  # replicas that already failed this request


class Candidate:
    """A replica considered for one request (slots: a hundred are built per decision)."""

    __slots__ = ("load", "pending", "replica", "replica_id", "report")

    def __init__(self, replica: ReplicaInfo, report: LoadReport | None, load: ModelLoad | None):
        self.replica = replica
        self.replica_id = replica.replica_id
        self.report = report  # the replica's latest load report, fresh or not
        self.load = load  # the model's figures in that report, if it has them
        self.pending = 0  # this scheduler's reservations on it the report does not yet show

    def __repr__(self) -> str:
        return f"Candidate({self.replica_id!r}, pending={self.pending})"


@dataclass
class RoutingContext:
    """What every plugin may read for one decision."""

    query: RouteQuery
    now: float
    loads: Mapping[str, LoadReport]
    breakers: Breakers
    prefix: PrefixIndex
    kv: KvIndex  # what the engines report holding (precise prefix routing)
    load_stale_after_s: float
    queue_scale: int  # requests that halve the queue score when the engine reports no `max`
    notes: list[str] = field(default_factory=list)  # why the decision fell back, for the log
