"""Registers a servicer so that a frame that is not a valid protobuf message reaches it as a
`MalformedFrame` instead of failing inside gRPC.

grpcio answers a request it cannot deserialize with UNKNOWN ("Unexpected DecodeError"), which
says nothing to the client and breaks the rule that what a client sends never yields UNKNOWN or
INTERNAL. With `add_servicer`, the servicer gets the sentinel and answers INVALID_ARGUMENT
itself (`MalformedFrame.error()`), naming the message type it expected — after its own checks
of who calls (the gateway's public services) — or, with `refuse_malformed`, the registration
answers so before the servicer runs (the internal services, whose callers the caller table
has already checked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import ServiceDescriptor

from services.common import errors, status

__all__ = ["MalformedFrame", "add_servicer"]


class MalformedFrame:
    """What the servicer gets in place of a frame that does not parse."""

    def __init__(self, type_name: str, problem: str):
        self.type_name = type_name
        self.problem = problem

    def error(self, field: str = "request") -> errors.InvalidArgument:
        return errors.InvalidArgument(
            field, f"is not a valid {self.type_name} message ({self.problem[:200]})")


def _tolerant(cls: type[message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (message.DecodeError, ValueError, RuntimeError) as exc:
            return MalformedFrame(cls.DESCRIPTOR.full_name, str(exc))

    return parse


async def _refused(frame: MalformedFrame, context: grpc.aio.ServicerContext) -> None:
    await status.abort(context, frame.error())


def _refusing(behaviour: Callable[..., Any], client_streaming: bool,
              server_streaming: bool) -> Callable[..., Any]:
    """`behaviour` behind a check that answers a malformed frame INVALID_ARGUMENT: a unary
    request before the servicer runs, a frame of a request stream as the servicer reads it."""
    if client_streaming:
        async def frames(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[Any]:
            async for frame in requests:
                if isinstance(frame, MalformedFrame):
                    await _refused(frame, context)
                yield frame

        if server_streaming:
            async def stream_stream(requests, context):
                async for response in behaviour(frames(requests, context), context):
                    yield response
            return stream_stream

        async def stream_unary(requests, context):
            return await behaviour(frames(requests, context), context)
        return stream_unary

    if server_streaming:
        async def unary_stream(request, context):
            if isinstance(request, MalformedFrame):
                await _refused(request, context)
            async for response in behaviour(request, context):
                yield response
        return unary_stream

    async def unary_unary(request, context):
        if isinstance(request, MalformedFrame):
            await _refused(request, context)
        return await behaviour(request, context)
    return unary_unary


def add_servicer(server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor, *,
                 refuse_malformed: bool = False) -> None:
    """As the generated `add_<Service>Servicer_to_server`, with tolerant request parsing; with
    `refuse_malformed`, the servicer never sees a `MalformedFrame`."""
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        behaviour = getattr(servicer, method.name)
        if refuse_malformed:
            behaviour = _refusing(behaviour, method.client_streaming, method.server_streaming)
        handlers[method.name] = make(
            behaviour, request_deserializer=_tolerant(request),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
