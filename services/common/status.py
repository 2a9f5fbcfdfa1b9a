"""Maps `errors.MeshError` to gRPC statuses with machine-readable details, and back.

A status carries `google.rpc.ErrorInfo` (reason, the offending field), `google.rpc.BadRequest`
for an invalid field and, when the caller may retry, `google.rpc.RetryInfo`, so SDKs can act
without parsing the message.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from infermesh.v1 import inference_pb2
from services.common import errors

DOMAIN = "infermesh.dev"
DETAILS_KEY = "grpc-status-details-bin"


def grpc_code(error: errors.MeshError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def to_rich_status(error: errors.MeshError) -> grpc.Status:
    details = []
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=DOMAIN)
    if error.field:
        info.metadata["field"] = error.field
    if error.reason:
        info.metadata["reason"] = error.reason
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.field and error.code == "INVALID_ARGUMENT":
        # The standard detail for a bad field (google.rpc.BadRequest), which generic gRPC
        # clients read; ErrorInfo's metadata above says the same for ours.
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field,
                                                        description=error.message)])
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if error.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo(retry_delay=seconds_to_duration(error.retry_after_s))
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    status = status_pb2.Status(
        code=grpc_code(error).value[0], message=error.message, details=details
    )
    return rpc_status.to_status(status)


REFUSAL_DRAIN_S = 1.0


async def abort_stream(
    context: grpc.aio.ServicerContext, error: errors.MeshError, request_iterator: Any
) -> None:
    """Ends a client-streaming call with `error` after reading what the client is sending (up to
    REFUSAL_DRAIN_S): a status sent while the client is mid-write reaches it as INTERNAL ("Internal
    error from Core") instead of the real code."""
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
        async with asyncio.timeout(REFUSAL_DRAIN_S):
            async for _ in request_iterator:
                pass
    await abort(context, error)


async def abort(context: grpc.aio.ServicerContext, error: errors.MeshError) -> None:
    """Ends the RPC with the error's status and details (raises, as `context.abort` does)."""
    status = to_rich_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def from_rpc_error(error: grpc.aio.AioRpcError) -> errors.MeshError:
    """Turns a peer's status back into our exception, keeping field and retry delay."""
    code = error.code().name
    field = ""
    reason = ""
    retry_after_s = None
    for key, value in error.trailing_metadata() or ():
        if key != DETAILS_KEY:
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                field = info.metadata.get("field", "")
                reason = info.metadata.get("reason", "")
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
    message = error.details() or code
    if code == "INVALID_ARGUMENT":
        return errors.InvalidArgument.relayed(field or "request", message)
    cls = errors.BY_CODE.get(code, errors.Internal)
    return cls(message, field=field, retry_after_s=retry_after_s, reason=reason)


def to_error(error: errors.MeshError) -> inference_pb2.Error:
    """The error as a message inside a stream (one call's verdict, not the stream's status)."""
    message = inference_pb2.Error(code=error.code, message=error.message, field=error.field,
                                  reason=error.reason)
    if error.retry_after_s is not None:
        message.retry_after.CopyFrom(seconds_to_duration(error.retry_after_s))
    return message


def from_error(message: inference_pb2.Error) -> errors.MeshError:
    """`to_error`'s inverse: the exception a peer's in-stream error stands for."""
    if message.code == "INVALID_ARGUMENT":
        return errors.InvalidArgument.relayed(message.field or "request", message.message)
    cls = errors.BY_CODE.get(message.code, errors.Internal)
    retry_after_s = (message.retry_after.ToTimedelta().total_seconds()
                     if message.HasField("retry_after") else None)
    return cls(message.message, field=message.field, retry_after_s=retry_after_s,
               reason=message.reason)


def seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
