"""Which API surface each .proto file belongs to (docs/decisions.md § The public, admin and
internal APIs): every file is placed, a surface imports only from the surfaces it may build on,
and the Python SDK ships exactly the public and admin files."""

from __future__ import annotations

import pathlib
import re
import runpy

import pytest

from services.common.protogen import PACKAGE, PROTO_ROOT

API = PROTO_ROOT / PACKAGE
SURFACES = {
    "inference.proto": "public",  # Inference: every client
    "tenants.proto": "admin",  # TenantAdmin, on the gateway: admin keys
    "registry.proto": "admin",  # Registry: any key reads, admin keys change (blobs: replicas too)
    "auditor.proto": "admin",  # Auditor: queries and proofs (Append: gateways and the registry)
    "scheduler.proto": "internal",  # Scheduler: gateways (ListReplicas: the operator)
    "ratelimit.proto": "internal",  # RateLimit: gateways
    "kv_events.proto": "internal",  # KvEventsService, on each sidecar: schedulers
}
# What a surface's files may import besides google/protobuf's well-known types.
MAY_IMPORT = {"public": {"public"}, "admin": {"public", "admin"},
              "internal": {"public", "admin", "internal"}}


def test_every_proto_file_has_a_surface_and_imports_only_what_it_may():
    assert sorted(SURFACES) == sorted(p.name for p in API.glob("*.proto")), (
        "place the new .proto file in SURFACES and in the decision")
    for name, surface in SURFACES.items():
        for imported in re.findall(r'^import "([^"]+)";', (API / name).read_text(), re.M):
            if imported.startswith("google/protobuf/"):
                continue
            target = SURFACES[pathlib.PurePosixPath(imported).name]
            assert target in MAY_IMPORT[surface], f"{name} ({surface}) imports {imported}"


def test_the_sdk_ships_the_public_and_admin_files(monkeypatch: pytest.MonkeyPatch):
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **_: None)
    sdk = runpy.run_path(str(PROTO_ROOT.parent / "sdk" / "python" / "setup.py"))

    def files(surface: str) -> set[str]:
        return {name for name, placed in SURFACES.items() if placed == surface}

    assert {pathlib.PurePosixPath(f).name for f in sdk["PUBLIC_API"]} == files("public")
    assert {pathlib.PurePosixPath(f).name for f in sdk["ADMIN_API"]} == files("admin")
