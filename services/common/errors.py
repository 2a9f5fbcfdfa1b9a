"""The one exception tree every service raises; the gRPC layer maps it to status codes.

    MeshError
    ├── Unauthenticated        missing, unknown or revoked API key
    ├── PermissionDenied       the key's role may not do this
    ├── InvalidArgument        a request field is wrong (names the field and the limit)
    ├── NotFound               unknown model, version, alias, tenant
    ├── FailedPrecondition     a compare-and-swap lost, or the state forbids the change
    ├── ResourceExhausted      quota or overload; carries a retry delay
    ├── DeadlineExceeded       the request's deadline passed
    ├── Unavailable            no healthy replica or peer; safe to retry
    ├── Cancelled              the client cancelled
    └── Internal               a bug or a broken dependency

Domain modules raise these and know nothing of gRPC (`status.py` does the mapping).
"""

from __future__ import annotations


class MeshError(Exception):
    code = "INTERNAL"

    def __init__(
        self, message: str, *, field: str = "", retry_after_s: float | None = None,
        reason: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.reason = reason  # machine-readable cause, e.g. "rpm", "budget", "queue_full"


class Unauthenticated(MeshError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    code = "PERMISSION_DENIED"


class InvalidArgument(MeshError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field)

    @classmethod
    def relayed(cls, field: str, message: str) -> InvalidArgument:
        """The error as a peer reported it: its message already names the field."""
        error = cls(field, message)
        error.message = message
        error.args = (message,)
        return error


class NotFound(MeshError):
    code = "NOT_FOUND"


class FailedPrecondition(MeshError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(MeshError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(MeshError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(MeshError):
    code = "UNAVAILABLE"


class Cancelled(MeshError):
    code = "CANCELLED"


class Internal(MeshError):
    code = "INTERNAL"


BY_CODE: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (
        Unauthenticated,
        PermissionDenied,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Cancelled,
        Internal,
    )
}
