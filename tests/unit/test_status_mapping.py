"""Errors survive a hop: field and retry delay go out as rich status details and come back."""

import grpc
import pytest

from services.common import errors, status


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, rich: grpc.Status):
        super().__init__(rich.code, grpc.aio.Metadata(), grpc.aio.Metadata(*rich.trailing_metadata),
                         details=rich.details)


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidArgument("params.top_p", "must be in (0, 1]"),
        errors.ResourceExhausted("over quota", retry_after_s=1.5),
        errors.NotFound("no such model"),
        errors.Unavailable("no replica", retry_after_s=1.0),
    ],
)
def test_round_trip(error):
    back = status.from_rpc_error(FakeRpcError(status.to_rich_status(error)))
    assert type(back) is type(error)
    assert back.message == error.message
    assert back.field == error.field
    assert back.retry_after_s == error.retry_after_s
