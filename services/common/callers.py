"""Who may call what: one table, every RPC of every mesh server, enforced by one interceptor.

With TLS, a caller's identity is the mesh kind in its verified certificate (`tls.caller_kind`).
A method admits the kinds in its `services` on their certificate alone; when it also admits
`key_holders`, any other caller gets through to the servicer, which then needs an API key (the
servicer's own check). Anything else is refused before the servicer runs: UNAUTHENTICATED when
the caller has no mesh identity, PERMISSION_DENIED when it is the wrong service.

In plaintext development there are no identities: a caller holding the mesh token
(`INFERMESH_MESH_TOKEN`, when one is set) counts as a mesh service, and without a token the
service-only methods admit anyone, as a single developer's loopback mesh always did.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from services.common import errors, status, tls
from services.common.discovery import MESH_TOKEN_HEADER, mesh_token_matches
from services.common.interceptors import rewrap

PLAINTEXT_MESH = "plaintext-mesh"  # what `mesh_caller` says for a mesh-token holder


@dataclass(frozen=True)
class Callers:
    """Who may call one method."""

    services: frozenset[str] = frozenset()  # kinds admitted on their certificate alone
    key_holders: bool = False  # anyone else, with an API key the servicer checks


def _services(*kinds: str) -> Callers:
    return Callers(frozenset(kinds))


# Anyone with an API key, checked by the servicer: on the public gateway nothing else is needed;
# on an internal listener the caller also needs a mesh certificate (an operator's meshctl).
API_KEY = Callers(key_holders=True)
# Blob and version reads: replicas fetch what they serve, gateways their tokenizers, without a
# key; an operator reads with a key too.
MODEL_FILES = Callers(frozenset({"sidecar", "gateway"}), key_holders=True)

CALLERS: dict[str, Callers] = {
    **{f"/infermesh.v1.Inference/{m}": API_KEY
       for m in ("Generate", "GenerateStream", "ListModels", "GetModel")},
    **{f"/infermesh.v1.TenantAdmin/{m}": API_KEY
       for m in ("CreateTenant", "UpdateTenant", "GetTenant", "ListTenants", "IssueKey",
                 "RevokeKey", "ListKeys")},
    "/infermesh.v1.RateLimit/Lease": _services("gateway"),
    "/infermesh.v1.RateLimit/GetUsage": _services("gateway"),  # TenantAdmin's tenant show
    "/infermesh.v1.Scheduler/Route": _services("gateway"),
    "/infermesh.v1.Scheduler/Release": _services("gateway"),
    "/infermesh.v1.Scheduler/RouteStream": _services("gateway"),
    "/infermesh.v1.Scheduler/ListReplicas": _services(tls.OPERATOR),  # meshctl replicas
    # A sidecar's engines' KV events, to every scheduler that routes (precise prefix routing).
    "/infermesh.v1.KvEventsService/Subscribe": _services("scheduler"),
    # The event's `source` must name the caller's kind too (the auditor checks, `mesh_caller`).
    "/infermesh.v1.Auditor/Append": _services("gateway", "registry"),
    **{f"/infermesh.v1.Auditor/{m}": API_KEY
       for m in ("Verify", "Query", "GetCheckpoint", "ProveInclusion", "ProveConsistency")},
    **{f"/infermesh.v1.Registry/{m}": MODEL_FILES
       for m in ("GetBlobStatus", "DownloadBlob", "GetVersion", "ListVersions", "ListModels",
                 "GetRouting")},
    **{f"/infermesh.v1.Registry/{m}": API_KEY
       for m in ("UploadBlob", "RegisterVersion", "ChangeRouting", "ListHistory",
                 "CollectGarbage")},
    "/grpc.health.v1.Health/Check": API_KEY,
    "/grpc.health.v1.Health/Watch": API_KEY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": API_KEY,
}

REFUSED = Counter(
    "infermesh_grpc_server_refused_total",
    "Calls refused before their handler ran, by method and reason (no_identity: no mesh "
    "certificate; wrong_service: a service the method does not admit; no_mesh_token: "
    "plaintext development without the mesh token; unknown_method: not in the table).",
    ["method", "reason"],
)

_mesh_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mesh_caller", default=None)


def mesh_caller() -> str | None:
    """Inside a handler: the service kind admitted on its certificate (`PLAINTEXT_MESH` for a
    mesh-token holder in plaintext development); None for a caller that needs an API key."""
    return _mesh_caller.get()


@dataclass(frozen=True)
class Verdict:
    """What `judge` decided: admitted (as `mesh_caller`, or as a key holder) or `refused`."""

    mesh_caller: str | None = None
    refused: errors.MeshError | None = None  # its `reason` labels REFUSED


def judge(method: str, callers: Callers | None, kind: str | None, tls_on: bool,
          token_sent: bool, token_set: bool) -> Verdict:
    """The decision for one call, from what the handshake (`kind`) and metadata proved."""
    if callers is None:
        return Verdict(refused=errors.PermissionDenied(
            f"{method} is not in the mesh's caller table", reason="unknown_method"))
    if tls_on:
        if kind in callers.services:
            return Verdict(mesh_caller=kind)
        if callers.key_holders:
            return Verdict()
        if kind is None:
            return Verdict(refused=errors.Unauthenticated(
                f"{method} is for mesh services: present a mesh certificate",
                reason="no_identity"))
        allowed = ", ".join(sorted(callers.services))
        return Verdict(refused=errors.PermissionDenied(
            f"{method} may be called by {allowed}, not {kind}", reason="wrong_service"))
    if token_set and token_sent:
        return Verdict(mesh_caller=PLAINTEXT_MESH)
    if callers.key_holders or not token_set:
        return Verdict()
    return Verdict(refused=errors.Unauthenticated(
        f"{method} is for mesh services: {MESH_TOKEN_HEADER} is missing or wrong",
        field=MESH_TOKEN_HEADER, reason="no_mesh_token"))


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Admits or refuses each call by `CALLERS`, before the servicer sees it."""

    def __init__(self, tls_on: bool, mesh_token: str = ""):
        self._tls_on = tls_on
        self._mesh_token = mesh_token

    def _verdict(self, method: str, context: grpc.aio.ServicerContext) -> Verdict:
        kind = tls.caller_kind(context) if self._tls_on else None
        sent = (not self._tls_on and bool(self._mesh_token)
                and mesh_token_matches(context.invocation_metadata(), self._mesh_token))
        return judge(method, CALLERS.get(method), kind, self._tls_on, sent,
                     bool(self._mesh_token))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        client_streams = handler.stream_unary is not None or handler.stream_stream is not None

        async def admit(request: Any, context: grpc.aio.ServicerContext) -> None:
            verdict = self._verdict(method, context)
            if verdict.refused is not None:
                REFUSED.labels(method, verdict.refused.reason).inc()
                if client_streams:
                    await status.abort_stream(context, verdict.refused, request)
                await status.abort(context, verdict.refused)
            _mesh_caller.set(verdict.mesh_caller)

        unary_behavior = handler.unary_unary or handler.stream_unary
        stream_behavior = handler.unary_stream or handler.stream_stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(request, context)
            return await unary_behavior(request, context)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(request, context)
            async for response in stream_behavior(request, context):
                yield response

        return rewrap(handler, unary, stream)
