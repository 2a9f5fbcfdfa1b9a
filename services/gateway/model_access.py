"""Which models and versions a tenant may use: its plan's `models` and `version_grants`.

    a bare name, @production, @canary, @previous    allowed when the plan allows the model
                                                    (`models` empty: every model)
    any other pin (@shadow, @sha256:… of a version  also needs an admin key or the version in
    no alias points at: withdrawn, never promoted)  the plan's `version_grants`

A pin by id of a version no replica serves makes the scheduler load it ("pinned" placement), so
this check also keeps tenants from making the mesh load arbitrary old versions. It runs after
the reference is resolved and before validation, quota and routing. Pure: no grpc, no etcd.
"""

from __future__ import annotations

from services.common import errors
from services.common.auth import Principal
from services.registry.catalog import Resolution
from services.registry.rollout import Routing

# The aliases a rollout keeps serving: pins to their targets are ordinary traffic.
OPEN_ALIASES = ("production", "canary", "previous")


def model_allowed(principal: Principal, name: str) -> bool:
    models = principal.plan.models
    return not models or name in models


def check_access(principal: Principal, resolution: Resolution, routing: Routing) -> None:
    """PermissionDenied (field `model`) when the tenant may not use what the request resolved
    to; an admin key may pin any version of a model its plan allows."""
    version = resolution.version
    if not model_allowed(principal, version.name):
        raise errors.PermissionDenied(
            f"tenant {principal.tenant_id!r} may not use model {version.name!r} (its plan "
            "lists the models it may use)", field="model")
    if resolution.arm != "pinned" or principal.is_admin:
        return
    if any(routing.target(alias) == version.version_id for alias in OPEN_ALIASES):
        return
    if version.version_id in principal.plan.version_grants:
        return
    raise errors.PermissionDenied(
        f"version {version.version_id} of {version.name!r} is not production, canary or "
        "previous: pinning it needs an admin key or a grant in the tenant's plan "
        "(meshctl tenant update --version-grants)", field="model")
