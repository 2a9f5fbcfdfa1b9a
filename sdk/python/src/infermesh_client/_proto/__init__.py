"""The API's message classes, built at import from the descriptor sets compiled at build time.

They live in a descriptor pool of their own rather than protobuf's default one: a process that
also imports other generated code for the same .proto files (the mesh's own services, an
internal service with its own stubs, a different API version) never meets a "duplicate file"
or "duplicate symbol" error, whichever copy it imported first. Generated `_pb2` modules would
also tie the package to the protobuf release of the protoc that built it.
"""

from __future__ import annotations

import pathlib
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_HERE = pathlib.Path(__file__).resolve().parent
POOL = descriptor_pool.DescriptorPool()


def _load(name: str) -> None:
    path = _HERE / name
    if not path.is_file():
        raise ImportError(
            f"infermesh_client: {path} is missing; the package was not built (pip install "
            "./sdk/python builds it; an editable install needs `make install` after the protos "
            "change)")
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    for file in files:  # dependencies come first in a descriptor set
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.Add(file)


_load("inference.binpb")
_load("admin.binpb")
_load("rpc_status.binpb")


def message(full_name: str) -> Any:
    """The class of the message `full_name` (e.g. "infermesh.v1.GenerateRequest")."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


def rpc(service: str, name: str) -> tuple[str, Any, Any]:
    """Method `name` of `service` (e.g. "infermesh.v1.Registry", "ListVersions"): its path, its
    request class and its response class."""
    method = POOL.FindServiceByName(service).methods_by_name[name]
    return (f"/{service}/{name}", message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type))


def enum_names(full_name: str) -> dict[int, str]:
    return {value.number: value.name for value in POOL.FindEnumTypeByName(full_name).values}


GenerateRequest = message("infermesh.v1.GenerateRequest")
GenerateResponse = message("infermesh.v1.GenerateResponse")
SamplingParams = message("infermesh.v1.SamplingParams")
ChatMessage = message("infermesh.v1.ChatMessage")
ClientFrame = message("infermesh.v1.ClientFrame")
Cancel = message("infermesh.v1.Cancel")
ServerFrame = message("infermesh.v1.ServerFrame")
ListModelsRequest = message("infermesh.v1.ListModelsRequest")
ListModelsResponse = message("infermesh.v1.ListModelsResponse")
GetModelRequest = message("infermesh.v1.GetModelRequest")
ModelInfo = message("infermesh.v1.ModelInfo")
Status = message("google.rpc.Status")
ErrorInfo = message("google.rpc.ErrorInfo")
RetryInfo = message("google.rpc.RetryInfo")
BadRequest = message("google.rpc.BadRequest")
FINISH_REASONS = enum_names("infermesh.v1.FinishReason")
PRIORITIES = enum_names("infermesh.v1.Priority")
INFERENCE_SERVICE = POOL.FindServiceByName("infermesh.v1.Inference").full_name
