"""The Registry gRPC servicer: decodes, calls the store or the catalog, encodes."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from infermesh.v1 import registry_pb2, registry_pb2_grpc
from services.common import errors, etcd, status
from services.common.runtime import ServiceContext, ServiceParts
from services.registry.catalog import ModelCatalog
from services.registry.store import RegistryStore, parse_models_key


def manifest_to_dict(manifest: registry_pb2.ModelManifest) -> dict[str, Any]:
    """The canonical-form dict: every field present, proto field names."""
    return json_format.MessageToDict(
        manifest, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def manifest_from_dict(manifest: dict[str, Any]) -> registry_pb2.ModelManifest:
    return json_format.ParseDict(manifest, registry_pb2.ModelManifest())


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, store: RegistryStore, catalog: ModelCatalog):
        self._store = store
        self._catalog = catalog

    async def RegisterVersion(self, request, context):
        try:
            version, created = await self._store.register(manifest_to_dict(request.manifest))
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.RegisterVersionResponse(version_id=version.version_id, created=created)

    async def SetAlias(self, request, context):
        try:
            previous = await self._store.set_alias(
                request.model, request.alias, request.version_id,
                request.expected_version_id, request.actor, request.reason,
            )
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.SetAliasResponse(previous_version_id=previous)

    async def Resolve(self, request, context):
        try:
            version = self._catalog.resolve(request.model)
        except errors.MeshError as exc:
            await status.abort(context, exc)
        return registry_pb2.ResolveResponse(
            version_id=version.version_id, manifest=manifest_from_dict(version.manifest)
        )

    async def ListModels(self, request, context):
        return registry_pb2.ListRegisteredModelsResponse(
            models=[
                registry_pb2.RegisteredModel(
                    name=entry.name, aliases=entry.aliases, version_ids=sorted(entry.versions)
                )
                for entry in self._catalog.models()
            ]
        )


async def setup(ctx: ServiceContext) -> ServiceParts:
    catalog = ModelCatalog()
    cache: etcd.WatchCache[dict[str, Any]] = etcd.WatchCache(
        ctx.etcd, etcd.Keys.models, parse_models_key, on_change=lambda: catalog.rebuild(cache.items)
    )
    await cache.start()
    registry_pb2_grpc.add_RegistryServicer_to_server(
        RegistryServicer(RegistryStore(ctx.etcd, catalog), catalog), ctx.server
    )
    return ServiceParts(
        [registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name], cleanup=cache.stop
    )



