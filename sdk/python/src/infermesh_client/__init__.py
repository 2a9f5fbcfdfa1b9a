"""Python client for the infermesh inference API.

    from infermesh_client import Client

    with Client() as client:                      # INFERMESH_GATEWAY, INFERMESH_API_KEY, …
        print(client.generate("demo-chat", "Hello", max_tokens=32).text)
        with client.stream("demo-chat", messages=[{"role": "user", "content": "Hi"}]) as s:
            for delta in s:
                print(delta.text, end="", flush=True)
        client.registry.rollback("demo-chat", reason="worse answers")  # an admin key
"""

from __future__ import annotations

__version__ = "0.1.0"

from infermesh_client._admin_types import (
    AdminRecord,
    AuditRecord,
    GarbageCollection,
    GenerationRecord,
    HistoryEntry,
    HistoryPage,
    IssuedKey,
    KeyInfo,
    LocalBlob,
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
from infermesh_client._async_client import AsyncClient, AsyncGenerationStream
from infermesh_client._config import ConfigurationError
from infermesh_client._errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InfermeshError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from infermesh_client._retry import NO_RETRIES, RetryPolicy
from infermesh_client._sync_client import Client, GenerationStream
from infermesh_client._types import Delta, Generation, Message, ModelInfo, Timings, Usage

__all__ = [
    "NO_RETRIES",
    "AdminRecord",
    "AsyncClient",
    "AsyncGenerationStream",
    "AuditRecord",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "DeadlineExceeded",
    "Delta",
    "FailedPrecondition",
    "GarbageCollection",
    "Generation",
    "GenerationRecord",
    "GenerationStream",
    "HistoryEntry",
    "HistoryPage",
    "InfermeshError",
    "InvalidArgument",
    "IssuedKey",
    "KeyInfo",
    "LocalBlob",
    "Message",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "Plan",
    "PlanChange",
    "RateLimited",
    "RegisteredModel",
    "RegisteredVersion",
    "ReplicaMove",
    "RetryPolicy",
    "Routing",
    "RoutingChange",
    "ServerError",
    "Tenant",
    "Timings",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "VersionInfo",
    "__version__",
]
