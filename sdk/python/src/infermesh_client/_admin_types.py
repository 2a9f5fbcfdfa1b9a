"""What the admin surface returns and takes: plain frozen dataclasses, no protobuf types.
Times are timezone-aware UTC `datetime`s; None where the server set none. A result read from
the mesh also has `to_dict()`: the object exactly as the API defines it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from google.protobuf import json_format


class ApiResult:
    """What a result read from the mesh shares: the API's own form of it."""

    _message: Any  # the reply it was decoded from (None: built by hand)

    def to_dict(self) -> dict[str, Any]:
        """The object as the API's JSON mapping: the `.proto` field names, every field (zeros
        too), timestamps as RFC 3339 strings. What a tool prints for `-o json`; stable across
        client versions as the API is. Only for results read from the mesh (ValueError else)."""
        if self._message is None:
            raise ValueError(f"this {type(self).__name__} was built by hand, not read from "
                             "the mesh: it has no API form")
        return json_format.MessageToDict(self._message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)


@dataclass(frozen=True)
class Plan:
    """A tenant's plan: what its keys may use (0 = none, for the budget and the degraded cap)."""

    priority: str  # premium | standard | free | batch
    requests_per_minute: int
    input_tokens_per_minute: int
    output_tokens_per_minute: int
    max_concurrency: int
    max_context_tokens: int
    max_output_tokens: int
    monthly_token_budget: int
    degraded_max_tokens: int  # under pressure max_tokens is capped to this
    audit_text_hashes: bool  # audit records carry sha256 of prompt and completion
    models: tuple[str, ...]  # the models its keys may use; empty: every model
    version_grants: tuple[str, ...]  # version ids it may pin beyond the rollout's aliases
    # No prefix affinity in routing and no engine prefix-cache entry shared with other tenants.
    isolate_prefix_cache: bool
    # Deterministic requests repeated within the gateway's TTL are answered from the first
    # answer, free of charge.
    response_cache: bool


@dataclass(frozen=True)
class PlanChange:
    """The plan fields to set; None leaves a field as it is (on create: the default)."""

    priority: Optional[str] = None
    requests_per_minute: Optional[int] = None
    input_tokens_per_minute: Optional[int] = None
    output_tokens_per_minute: Optional[int] = None
    max_concurrency: Optional[int] = None
    max_context_tokens: Optional[int] = None
    max_output_tokens: Optional[int] = None
    monthly_token_budget: Optional[int] = None
    degraded_max_tokens: Optional[int] = None
    audit_text_hashes: Optional[bool] = None
    models: Optional[tuple[str, ...]] = None  # replaces the list (even with an empty one)
    version_grants: Optional[tuple[str, ...]] = None
    isolate_prefix_cache: Optional[bool] = None
    response_cache: Optional[bool] = None


@dataclass(frozen=True)
class Tenant(ApiResult):
    tenant_id: str
    name: str
    plan: Plan
    revision: int  # pass it back as `expected_revision` to update only what you read
    month: str  # the month (UTC) the usage below counts
    tokens_used: int
    slots_leased: int  # concurrency slots its gateways hold now
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class KeyInfo(ApiResult):
    key_id: str
    tenant_id: str
    role: str  # user | admin
    created_at: Optional[datetime]
    expires_at: Optional[datetime]  # None: never
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class IssuedKey(ApiResult):
    api_key: str  # shown this once; the mesh keeps only its hash
    key: KeyInfo
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Routing(ApiResult):
    """Which versions serve a model; every change adds one to `revision`."""

    model: str
    revision: int  # 0: no routing yet
    production: str
    previous: str  # what a rollback returns to
    canary: str
    canary_weight_percent: float
    shadow: str
    shadow_rate: float
    updated_at: Optional[datetime]
    updated_by: str
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RegisteredModel(ApiResult):
    name: str
    routing: Routing
    version_count: int
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class VersionInfo(ApiResult):
    version_id: str  # "sha256:…", the digest of the canonical manifest
    model: str
    description: str
    registered_at: Optional[datetime]
    registered_by: str
    triton_model_name: str  # the engine that serves exactly this version
    manifest: dict[str, Any]  # the ModelManifest with its .proto field names
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class HistoryEntry(ApiResult):
    revision: int  # the routing revision this change made
    action: str  # promote | canary | clear_canary | shadow | clear_shadow | rollback
    actor: str  # "<tenant>/<key id>", or "registry/auto-rollback"
    reason: str
    at: Optional[datetime]
    before: Routing
    after: Routing
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class HistoryPage(ApiResult):
    entries: tuple[HistoryEntry, ...]  # oldest first
    next_before_revision: int  # pass as `before_revision` for the older page; 0: no more
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class LocalBlob:
    """A file a manifest pins, to upload: its `sha256:<hex>` digest and size in bytes."""

    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class RegisteredVersion(ApiResult):
    version_id: str  # "sha256:…", the digest of the canonical manifest
    created: bool  # False: that manifest was registered before (nothing changed)
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class GarbageCollection(ApiResult):
    deleted: tuple[str, ...]  # digests deleted (or, on a dry run, that would be)
    freed_bytes: int
    abandoned_uploads: int  # unfinished uploads removed
    kept: int  # blobs a version pins, or younger than the grace
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RoutingChange(ApiResult):
    routing: Routing  # as the change left it
    entry: HistoryEntry
    _message: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ReplicaMove:
    """A generation's move to another replica mid-stream (its replica failed)."""

    from_replica: str
    to_replica: str
    at_token: int  # completion tokens delivered before the move


@dataclass(frozen=True)
class GenerationRecord:
    tenant: str
    key_id: str
    model: str
    model_version: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error_code: str
    queue_ms: float
    ttft_ms: float
    total_ms: float
    client_address: str
    idempotency_key: str
    replica_id: str
    prompt_sha256: str  # only for plans with audit_text_hashes
    completion_sha256: str
    cached: bool  # answered from the gateway's response cache: no engine ran, nothing charged
    choice_index: int  # which of a request's n > 1 choices this record is (0 and 0 for n = 1)
    choice_count: int
    moves: tuple[ReplicaMove, ...] = ()  # mid-stream failover, in order


@dataclass(frozen=True)
class AdminRecord:
    actor: str
    action: str  # e.g. "registry.set_alias"
    target: str
    before_json: str
    after_json: str
    reason: str


@dataclass(frozen=True)
class AuditRecord(ApiResult):
    """One record of the audit log; `line` is it exactly as stored (its Merkle leaf)."""

    sequence: int
    appended: Optional[datetime]
    event_id: str
    request_id: str
    time: Optional[datetime]  # when the emitting service saw it happen
    source: str
    generation: Optional[GenerationRecord]  # exactly one of generation and admin is set
    admin: Optional[AdminRecord]
    truncated: tuple[str, ...]  # fields the emitter cut to their limit
    line: str
    _message: Any = field(default=None, repr=False, compare=False)
