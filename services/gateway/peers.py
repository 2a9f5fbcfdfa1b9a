"""Calls from the gateway to ratelimit and scheduler, with deadlines and error mapping."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from infermesh.v1 import ratelimit_pb2, ratelimit_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.common import errors, status
from services.common.discovery import ServiceDirectory


@dataclass(frozen=True)
class Grant:
    """An admitted request's concurrency slot and the output tokens it may generate."""

    slot_id: str
    max_tokens: int


@dataclass(frozen=True)
class Route:
    replica_id: str
    grpc_endpoint: str
    reservation_id: str


class Peers:
    def __init__(self, directory: ServiceDirectory, timeout_s: float):
        self._directory = directory
        self._timeout_s = timeout_s

    async def acquire_slot(
        self, tenant: str, request_id: str, hold_s: float, input_tokens: int, output_tokens: int
    ) -> Grant:
        """Reserves a request, its tokens and a concurrency slot, or raises ResourceExhausted
        with the reason and a retry delay."""
        stub = ratelimit_pb2_grpc.RateLimitStub(self._directory.channel("ratelimit"))
        try:
            reply = await stub.Acquire(
                ratelimit_pb2.AcquireRequest(
                    tenant=tenant, request_id=request_id,
                    hold=status.seconds_to_duration(hold_s),
                    input_tokens=input_tokens, output_tokens=output_tokens,
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise status.from_rpc_error(exc) from exc
        if not reply.allowed:
            retry_after_s = reply.retry_after.ToTimedelta().total_seconds()
            raise errors.ResourceExhausted(
                f"{reply.reason}: {reply.message}", reason=reply.reason,
                retry_after_s=retry_after_s or None,
            )
        return Grant(reply.slot_id, reply.max_tokens)

    async def release_slot(
        self, tenant: str, slot_id: str, input_used: int, output_used: int
    ) -> None:
        stub = ratelimit_pb2_grpc.RateLimitStub(self._directory.channel("ratelimit"))
        await stub.Release(
            ratelimit_pb2.ReleaseRequest(tenant=tenant, slot_id=slot_id,
                                         input_tokens_used=input_used,
                                         output_tokens_used=output_used),
            timeout=self._timeout_s,
        )

    async def route(
        self, triton_model_name: str, version_id: str, request_id: str, hold_s: float,
        exclude: list[str],
    ) -> Route:
        stub = scheduler_pb2_grpc.SchedulerStub(self._directory.channel("scheduler"))
        try:
            reply = await stub.Route(
                scheduler_pb2.RouteRequest(
                    triton_model_name=triton_model_name, version_id=version_id,
                    request_id=request_id, hold=status.seconds_to_duration(hold_s),
                    exclude_replicas=exclude,
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise status.from_rpc_error(exc) from exc
        return Route(reply.replica_id, reply.grpc_endpoint, reply.reservation_id)

    async def release_route(self, reservation_id: str) -> None:
        stub = scheduler_pb2_grpc.SchedulerStub(self._directory.channel("scheduler"))
        await stub.Release(
            scheduler_pb2.ReleaseRouteRequest(reservation_id=reservation_id),
            timeout=self._timeout_s,
        )
