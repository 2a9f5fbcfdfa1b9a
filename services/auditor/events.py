"""Audit events at the API edge: the checks an AppendRequest must pass, and the JSON stored."""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

from infermesh.v1 import auditor_pb2
from services.auditor.records import MAX_EVENT_ID_LENGTH
from services.common import errors

MAX_ID_LENGTH = 256  # request_id and source
# What an emitter keeps of each string field of an event (`bound_event`); every other string
# field is held to MAX_ID_LENGTH. Sized so that a bounded event stays far under the auditor's
# `max_event_bytes` (64 KiB by default) and many fit in one Append message.
EVENT_FIELD_LIMITS = {"admin.before_json": 16_384, "admin.after_json": 16_384,
                      "admin.reason": 4_096}
_DIGEST_MARK = "...sha256:"
_WELL_KNOWN = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                          FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                          FieldDescriptor.TYPE_SFIXED64})


def event_to_dict(message: Message) -> dict[str, Any]:
    """The JSON stored in a record: proto3 JSON with proto field names and unset fields left
    out, exactly as `json_format.MessageToDict(..., preserving_proto_field_name=True)` writes
    it, at a fraction of its cost (it is the auditor's largest cost per event)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        convert = _CONVERTERS.get(field)
        if convert is None:
            convert = _CONVERTERS[field] = _converter(field)
        out[field.name] = value if convert is None else convert(value)
    return out


_CONVERTERS: dict[FieldDescriptor, Callable[[Any], Any] | None] = {}


def _converter(field: FieldDescriptor) -> Callable[[Any], Any] | None:
    """How one field's value becomes JSON (None: as it is); built once per field."""
    single = _single_converter(field)
    if not field.is_repeated:
        return single
    if single is None:
        return list
    return lambda values: [single(value) for value in values]


def _single_converter(field: FieldDescriptor) -> Callable[[Any], Any] | None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name in _WELL_KNOWN:
            return lambda value: value.ToJsonString()
        return event_to_dict
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = {v.number: v.name for v in field.enum_type.values}
        return lambda value: names.get(value, value)
    if field.type in _INT64_TYPES:
        return str  # proto3 JSON writes 64-bit integers as strings
    if field.type == FieldDescriptor.TYPE_BYTES:
        return lambda value: base64.b64encode(value).decode("ascii")
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return _json_double
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return lambda value: (type_checkers.ToShortestFloat(value) if math.isfinite(value)
                              else _json_double(value))
    return None


def _json_double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def bound_event(event: auditor_pb2.AuditEvent) -> auditor_pb2.AuditEvent:
    """Cuts, in place, every string field over its limit to a prefix and the sha256 of the whole
    value (so the original can still be matched), and lists the field in `event.truncated`.
    Emitters call it before an event is kept anywhere: a client's oversized value must cost the
    audit trail a bounded number of bytes, never a batch the auditor cannot take."""
    for path, message, field in _string_fields(event):
        value = getattr(message, field.name)
        limit = EVENT_FIELD_LIMITS.get(path, MAX_ID_LENGTH)
        if len(value) > limit:
            digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
            setattr(message, field.name,
                    value[:limit - len(_DIGEST_MARK) - len(digest)] + _DIGEST_MARK + digest)
            event.truncated.append(path)
    return event


def _string_fields(event: auditor_pb2.AuditEvent) -> list[tuple[str, Message, FieldDescriptor]]:
    """(path, message, field) of the event's set string fields and its body's."""
    found: list[tuple[str, Message, FieldDescriptor]] = []
    for field, value in event.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            found.append((field.name, event, field))
        elif field.message_type is not None and field.containing_oneof is not None:
            found.extend((f"{field.name}.{inner.name}", value, inner)
                         for inner, _ in value.ListFields()
                         if inner.type == FieldDescriptor.TYPE_STRING and not inner.is_repeated)
    return found


def check_sources(request: auditor_pb2.AppendRequest, caller_kind: str) -> None:
    """PermissionDenied naming the event when a service writes in another's name: an event's
    `source` is `<kind>/<instance>`, and its kind must be the caller's (from its certificate)."""
    for index, event in enumerate(request.events):
        if event.source.partition("/")[0] != caller_kind:
            raise errors.PermissionDenied(
                f"events[{index}].source is {event.source[:MAX_ID_LENGTH]!r}, but the caller is "
                f"{caller_kind}: a service appends only its own events ({caller_kind}/…)",
                field=f"events[{index}].source")


def check_batch(
    request: auditor_pb2.AppendRequest, max_events: int, max_event_bytes: int
) -> None:
    """InvalidArgument naming the field and the limit when the batch cannot be stored whole."""
    count = len(request.events)
    if not count:
        raise errors.InvalidArgument("events", "must hold at least one event")
    if count > max_events:
        raise errors.InvalidArgument("events", f"holds {count} events, at most {max_events}")
    for index, event in enumerate(request.events):
        field = f"events[{index}]"
        if not event.event_id:
            raise errors.InvalidArgument(f"{field}.event_id", "must not be empty")
        for name, value, limit in (("event_id", event.event_id, MAX_EVENT_ID_LENGTH),
                                   ("request_id", event.request_id, MAX_ID_LENGTH),
                                   ("source", event.source, MAX_ID_LENGTH)):
            if len(value) > limit:
                raise errors.InvalidArgument(
                    f"{field}.{name}", f"is {len(value)} characters, at most {limit}")
        if event.WhichOneof("body") is None:
            raise errors.InvalidArgument(f"{field}.body", "must be a generation or admin record")
        size = event.ByteSize()
        if size > max_event_bytes:
            raise errors.InvalidArgument(field, f"is {size} bytes, at most {max_event_bytes}")
