"""The admin surface for blocking code: each method runs its `_admin` twin on the client's loop
thread, so both behave the same (see `infermesh_client._admin` for what each does)."""

from __future__ import annotations

import functools
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from infermesh_client._admin import (
    AsyncAdmin,
    AsyncAudit,
    AsyncKeys,
    AsyncRegistry,
    AsyncTenants,
)

if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec

    from infermesh_client._sync_client import _LoopThread

    P = ParamSpec("P")

T = TypeVar("T")


def _blocking(method: Callable[Concatenate[Any, P], Coroutine[Any, Any, T]],
              ) -> Callable[Concatenate[Any, P], T]:
    """A method of a blocking class that runs `method` of the async object it wraps."""

    @functools.wraps(method)
    def run(self: Any, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._async, *args, **kwargs))

    return run


class _Blocking:
    def __init__(self, loop: _LoopThread, wrapped: Any):
        self._loop = loop
        self._async = wrapped


class Tenants(_Blocking):
    """See `AsyncTenants`."""

    create = _blocking(AsyncTenants.create)
    update = _blocking(AsyncTenants.update)
    get = _blocking(AsyncTenants.get)
    list = _blocking(AsyncTenants.list)


class Keys(_Blocking):
    """See `AsyncKeys`."""

    issue = _blocking(AsyncKeys.issue)
    revoke = _blocking(AsyncKeys.revoke)
    list = _blocking(AsyncKeys.list)


class Admin:
    """`client.admin`: tenants and keys, served by the gateway."""

    def __init__(self, loop: _LoopThread, wrapped: AsyncAdmin):
        self.tenants = Tenants(loop, wrapped.tenants)
        self.keys = Keys(loop, wrapped.keys)


class Registry(_Blocking):
    """See `AsyncRegistry`."""

    models = _blocking(AsyncRegistry.models)
    versions = _blocking(AsyncRegistry.versions)
    version = _blocking(AsyncRegistry.version)
    routing = _blocking(AsyncRegistry.routing)
    history = _blocking(AsyncRegistry.history)
    promote = _blocking(AsyncRegistry.promote)
    canary = _blocking(AsyncRegistry.canary)
    clear_canary = _blocking(AsyncRegistry.clear_canary)
    shadow = _blocking(AsyncRegistry.shadow)
    clear_shadow = _blocking(AsyncRegistry.clear_shadow)
    rollback = _blocking(AsyncRegistry.rollback)
    push = _blocking(AsyncRegistry.push)
    collect_garbage = _blocking(AsyncRegistry.collect_garbage)


class Audit(_Blocking):
    """See `AsyncAudit`."""

    query = _blocking(AsyncAudit.query)
