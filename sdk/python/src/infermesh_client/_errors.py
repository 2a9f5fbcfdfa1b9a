"""The client's exception tree, built from a status's machine-readable details (never its text).

    InfermeshError              code, message, request_id; `generation` when it ended a stream
    ├── InvalidArgument         field, limit: a request field is wrong
    ├── Unauthenticated         missing, unknown, revoked or expired API key
    ├── PermissionDenied        the key may not do this (an admin action, a model or version)
    ├── NotFound                unknown model, version or alias
    ├── RateLimited             retry_after, reason: quota or overload (RESOURCE_EXHAUSTED)
    ├── DeadlineExceeded        the call's deadline passed
    ├── Unavailable             retry_after: no replica, a version still loading, no connection
    ├── Cancelled               the generation was cancelled
    ├── FailedPrecondition      the state forbids it
    └── ServerError             INTERNAL, UNKNOWN and every other status

`RateLimited` and `Unavailable` with a `retry_after` are what the client retries by itself
(`RetryPolicy`); catching them means its retries were used up or did not fit the deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from infermesh_client import _proto

if TYPE_CHECKING:
    from infermesh_client._types import Generation

DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


class InfermeshError(Exception):
    code = "UNKNOWN"

    def __init__(
        self, message: str, *, code: Optional[str] = None, request_id: str = "",
        field: str = "", reason: str = "", retry_after: Optional[float] = None,
        limit: Optional[str] = None, generation: Optional[Generation] = None,
    ):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.request_id = request_id
        self.field = field  # the offending request field, when there is one
        self.reason = reason  # machine-readable cause, e.g. "rpm", "output_tpm", "queue_full"
        self.retry_after = retry_after  # seconds the server asked the caller to wait
        self.limit = limit  # the limit a field broke, when the server named it
        # The stream's Final for this generation (finish_reason "error" or "deadline", usage,
        # timings, the text sent before the error); None for a unary call or a broken stream.
        self.generation = generation

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(InfermeshError):
    code = "INVALID_ARGUMENT"


class Unauthenticated(InfermeshError):
    code = "UNAUTHENTICATED"


class PermissionDenied(InfermeshError):
    code = "PERMISSION_DENIED"


class NotFound(InfermeshError):
    code = "NOT_FOUND"


class RateLimited(InfermeshError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(InfermeshError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(InfermeshError):
    code = "UNAVAILABLE"


class Cancelled(InfermeshError):
    code = "CANCELLED"


class FailedPrecondition(InfermeshError):
    code = "FAILED_PRECONDITION"


class ServerError(InfermeshError):
    code = "INTERNAL"


BY_CODE: dict[str, type[InfermeshError]] = {
    cls.code: cls for cls in (
        InvalidArgument, Unauthenticated, PermissionDenied, NotFound, RateLimited,
        DeadlineExceeded, Unavailable, Cancelled, FailedPrecondition, ServerError,
    )
}


def error_for(code: str, message: str, **details: Any) -> InfermeshError:
    """The exception for a status name; unknown names become `ServerError` keeping the code."""
    cls = BY_CODE.get(code)
    if cls is None:
        return ServerError(message, code=code, **details)
    return cls(message, **details)


def _seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def details_from_status(status_bytes: bytes) -> dict[str, Any]:
    """field, reason, limit and retry_after from a serialized google.rpc.Status."""
    found: dict[str, Any] = {}
    status = _proto.Status.FromString(status_bytes)
    for detail in status.details:
        if detail.type_url == _ERROR_INFO:
            info = _proto.ErrorInfo.FromString(detail.value)
            for key in ("field", "reason", "limit"):
                if key in info.metadata:
                    found[key] = info.metadata[key]
        elif detail.type_url == _RETRY_INFO:
            found["retry_after"] = _seconds(_proto.RetryInfo.FromString(detail.value).retry_delay)
        elif detail.type_url == _BAD_REQUEST:
            violations = _proto.BadRequest.FromString(detail.value).field_violations
            if violations and "field" not in found:
                found["field"] = violations[0].field
    return found


def from_rpc_error(error: Any, request_id: str = "") -> InfermeshError:
    """The exception for a failed call (a `grpc.RpcError` that is also a `grpc.Call`)."""
    details: dict[str, Any] = {}
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            details = details_from_status(value)
    return error_for(error.code().name, error.details() or "", request_id=request_id, **details)


def from_final(final: Any, generation: Generation) -> InfermeshError:
    """The exception for a stream's Final that ended in an error or at the deadline."""
    error = final.error
    retry_after = _seconds(error.retry_after) if error.HasField("retry_after") else None
    code = error.code or ("DEADLINE_EXCEEDED" if generation.finish_reason == "deadline"
                          else "UNKNOWN")
    return error_for(code, error.message, request_id=final.request_id, field=error.field,
                     reason=error.reason, retry_after=retry_after, generation=generation)


def duration_seconds(duration: Any) -> float:
    return _seconds(duration)
