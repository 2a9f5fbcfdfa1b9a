"""The caller table covers every RPC the mesh serves, and `judge` decides as documented."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from infermesh.v1 import (
    auditor_pb2,
    inference_pb2,
    kv_events_pb2,
    ratelimit_pb2,
    registry_pb2,
    scheduler_pb2,
    tenants_pb2,
)
from services.common import errors
from services.common.callers import CALLERS, PLAINTEXT_MESH, judge

MODULES = (auditor_pb2, inference_pb2, kv_events_pb2, ratelimit_pb2, registry_pb2, scheduler_pb2,
           tenants_pb2, health_pb2, reflection_pb2)


def test_every_rpc_of_every_service_is_in_the_table():
    served = {f"/{service.full_name}/{method.name}"
              for module in MODULES for service in module.DESCRIPTOR.services_by_name.values()
              for method in service.methods}
    assert served == set(CALLERS)


@pytest.mark.parametrize(("method", "kind", "admitted_as", "refusal"), [
    ("/infermesh.v1.RateLimit/Lease", "gateway", "gateway", None),
    ("/infermesh.v1.RateLimit/Lease", "sidecar", None, errors.PermissionDenied),
    ("/infermesh.v1.RateLimit/Lease", None, None, errors.Unauthenticated),
    ("/infermesh.v1.Scheduler/Release", "registry", None, errors.PermissionDenied),
    ("/infermesh.v1.Auditor/Append", "registry", "registry", None),
    ("/infermesh.v1.Auditor/Append", "operator", None, errors.PermissionDenied),
    # Model files: replicas on their certificate; an operator gets through to the key check.
    ("/infermesh.v1.Registry/DownloadBlob", "sidecar", "sidecar", None),
    ("/infermesh.v1.Registry/DownloadBlob", "operator", None, None),
    ("/infermesh.v1.Inference/Generate", None, None, None),
    ("/infermesh.v1.KvEventsService/Subscribe", "scheduler", "scheduler", None),
    ("/infermesh.v1.KvEventsService/Subscribe", "gateway", None, errors.PermissionDenied),
    ("/infermesh.v1.Nothing/Here", "gateway", None, errors.PermissionDenied),
])
def test_with_tls_the_certificate_decides(method, kind, admitted_as, refusal):
    verdict = judge(method, CALLERS.get(method), kind, tls_on=True, token_sent=False,
                    token_set=False)
    assert verdict.mesh_caller == admitted_as
    if refusal is None:
        assert verdict.refused is None
    else:
        assert isinstance(verdict.refused, refusal)
        assert verdict.refused.reason in {"no_identity", "wrong_service", "unknown_method"}


def test_plaintext_development_admits_token_holders_as_the_mesh():
    lease = CALLERS["/infermesh.v1.RateLimit/Lease"]
    assert judge("Lease", lease, None, False, token_sent=True, token_set=True).mesh_caller \
        == PLAINTEXT_MESH
    refused = judge("Lease", lease, None, False, token_sent=False, token_set=True).refused
    assert isinstance(refused, errors.Unauthenticated)
    assert refused.reason == "no_mesh_token"
    # A mesh without a token: nothing proves a call internal, and nothing is refused for it.
    assert judge("Lease", lease, None, False, token_sent=False, token_set=False).refused is None

