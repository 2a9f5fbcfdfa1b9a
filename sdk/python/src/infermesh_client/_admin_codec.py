"""The admin surface's protobuf replies → its dataclasses, and its arguments → requests."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any, Optional

from google.protobuf import json_format

from infermesh_client._admin_types import (
    AdminRecord,
    AuditRecord,
    GarbageCollection,
    GenerationRecord,
    HistoryEntry,
    HistoryPage,
    IssuedKey,
    KeyInfo,
    Plan,
    PlanChange,
    RegisteredModel,
    RegisteredVersion,
    ReplicaMove,
    Routing,
    RoutingChange,
    Tenant,
    VersionInfo,
)

_LIST_FIELDS = ("models", "version_grants")


def timestamp(message: Any, field: str) -> Optional[datetime]:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=timezone.utc)


def unix_seconds(seconds: float) -> Optional[datetime]:
    return datetime.fromtimestamp(seconds, timezone.utc) if seconds else None


def plan_update(change: PlanChange, message: Any) -> None:
    """Sets the fields `change` names on `message`, a PlanUpdate."""
    for field in dataclasses.fields(change):
        value = getattr(change, field.name)
        if value is None:
            continue
        if field.name in _LIST_FIELDS:
            getattr(message, field.name).SetInParent()  # set, even empty: replaces the list
            getattr(message, field.name).values.extend(value)
        else:
            setattr(message, field.name, value)


def plan(message: Any) -> Plan:
    return Plan(**{field.name: (tuple(getattr(message, field.name))
                                if field.name in _LIST_FIELDS else getattr(message, field.name))
                   for field in dataclasses.fields(Plan)})


def tenant(message: Any) -> Tenant:
    return Tenant(message.tenant_id, message.name, plan(message.plan), message.revision,
                  message.month, message.tokens_used, message.slots_leased, _message=message)


def key_info(message: Any) -> KeyInfo:
    """Times from the Timestamps; from the deprecated Unix seconds only when a server that
    predates them left the Timestamps unset."""
    created = timestamp(message, "create_time") or unix_seconds(message.created_at)
    expires = timestamp(message, "expire_time") or unix_seconds(message.expires_at)
    return KeyInfo(message.key_id, message.tenant_id, message.role, created, expires,
                   _message=message)


def routing(message: Any) -> Routing:
    return Routing(message.model, message.revision, message.production, message.previous,
                   message.canary, message.canary_weight_percent, message.shadow,
                   message.shadow_rate, timestamp(message, "updated_at"), message.updated_by,
                   _message=message)


def registered_model(message: Any) -> RegisteredModel:
    return RegisteredModel(message.name, routing(message.routing), message.version_count,
                           _message=message)


def version_info(message: Any) -> VersionInfo:
    manifest = json_format.MessageToDict(message.manifest, preserving_proto_field_name=True)
    return VersionInfo(message.version_id, message.manifest.name, message.manifest.description,
                       timestamp(message, "registered_at"), message.registered_by,
                       message.triton_model_name, manifest, _message=message)


def history_entry(message: Any) -> HistoryEntry:
    return HistoryEntry(message.revision, message.action, message.actor, message.reason,
                        timestamp(message, "at"), routing(message.before), routing(message.after),
                        _message=message)


def issued_key(message: Any) -> IssuedKey:
    return IssuedKey(message.api_key, key_info(message.key), _message=message)


def history_page(message: Any) -> HistoryPage:
    return HistoryPage(tuple(history_entry(e) for e in message.entries),
                       message.next_before_revision, _message=message)


def routing_change(message: Any) -> RoutingChange:
    return RoutingChange(routing(message.routing), history_entry(message.entry),
                         _message=message)


def registered_version(message: Any) -> RegisteredVersion:
    return RegisteredVersion(message.version_id, message.created, _message=message)


def garbage_collection(message: Any) -> GarbageCollection:
    return GarbageCollection(tuple(message.deleted), message.freed_bytes,
                             message.abandoned_uploads, message.kept, _message=message)


def _fields(cls: type, message: Any) -> Any:
    return cls(**{field.name: getattr(message, field.name) for field in dataclasses.fields(cls)})


def _generation(message: Any) -> GenerationRecord:
    values = {field.name: getattr(message, field.name)
              for field in dataclasses.fields(GenerationRecord) if field.name != "moves"}
    return GenerationRecord(**values,
                            moves=tuple(_fields(ReplicaMove, move) for move in message.moves))


def audit_record(message: Any) -> AuditRecord:
    event = message.event
    body = event.WhichOneof("body")
    return AuditRecord(
        message.sequence, timestamp(message, "appended"), event.event_id, event.request_id,
        timestamp(event, "time"), event.source,
        _generation(event.generation) if body == "generation" else None,
        _fields(AdminRecord, event.admin) if body == "admin" else None,
        tuple(event.truncated), message.line, _message=message)
