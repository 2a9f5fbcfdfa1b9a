"""Registers a servicer so that a frame that is not a valid protobuf message reaches it as a
`MalformedFrame` instead of failing inside gRPC.

grpcio answers a request it cannot deserialize with UNKNOWN ("Unexpected DecodeError"), which
says nothing to the client and breaks the rule that what a client sends never yields UNKNOWN or
INTERNAL. With `add_servicer`, the servicer gets the sentinel and answers INVALID_ARGUMENT
itself (`MalformedFrame.error()`), naming the message type it expected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import ServiceDescriptor

from services.common import errors

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


def add_servicer(server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor) -> None:
    """As the generated `add_<Service>Servicer_to_server`, with tolerant request parsing."""
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
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=_tolerant(request),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
