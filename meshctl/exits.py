"""meshctl's exit codes, and the one way a failure is reported: `error: CODE: message` on stderr
(with `(retry in 20.5 s)` when the mesh said when to retry), then the code below.

Scripts branch on these; the table is in the README and docs/cli.md (generated from here).
"""

from __future__ import annotations

import enum
from typing import NoReturn

import typer

from meshctl.times import format_duration


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # anything else: an internal error, or a check that failed (audit verify, …)
    USAGE = 2  # a bad command line, or local input that does not parse (click's own code)
    INVALID = 3  # the mesh refused the request's content (INVALID_ARGUMENT, OUT_OF_RANGE)
    AUTH = 4  # no key, a wrong key, or a key without the right (UNAUTHENTICATED, PERMISSION_DENIED)
    NOT_FOUND = 5  # no such tenant, key, model, version or record (NOT_FOUND)
    CONFLICT = 6  # it changed since you read it, or exists already (FAILED_PRECONDITION, …)
    REFUSED = 7  # over a quota or limit; retry later (RESOURCE_EXHAUSTED)
    UNAVAILABLE = 8  # the service could not be reached or did not answer in time


MEANING = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "any other failure: an internal error, or a check that failed "
                    "(`audit verify`, `check-proof`, `stack status` with a process down)",
    ExitCode.USAGE: "bad command line or local input (an unknown flag, a bad duration)",
    ExitCode.INVALID: "the mesh refused the request's content: INVALID_ARGUMENT, OUT_OF_RANGE",
    ExitCode.AUTH: "UNAUTHENTICATED, PERMISSION_DENIED: no key, a bad key, or not an admin key",
    ExitCode.NOT_FOUND: "NOT_FOUND: no such tenant, key, model, version or record",
    ExitCode.CONFLICT: "FAILED_PRECONDITION, ABORTED, ALREADY_EXISTS: changed since read "
                       "(`--expected-revision`), or exists already",
    ExitCode.REFUSED: "RESOURCE_EXHAUSTED: over a quota or limit; the message says when to retry",
    ExitCode.UNAVAILABLE: "UNAVAILABLE, DEADLINE_EXCEEDED: the service is unreachable or slow",
}

BY_STATUS = {
    "INVALID_ARGUMENT": ExitCode.INVALID, "OUT_OF_RANGE": ExitCode.INVALID,
    "UNAUTHENTICATED": ExitCode.AUTH, "PERMISSION_DENIED": ExitCode.AUTH,
    "NOT_FOUND": ExitCode.NOT_FOUND,
    "FAILED_PRECONDITION": ExitCode.CONFLICT, "ABORTED": ExitCode.CONFLICT,
    "ALREADY_EXISTS": ExitCode.CONFLICT,
    "RESOURCE_EXHAUSTED": ExitCode.REFUSED,
    "UNAVAILABLE": ExitCode.UNAVAILABLE, "DEADLINE_EXCEEDED": ExitCode.UNAVAILABLE,
}


def exit_code(status: str) -> ExitCode:
    """The exit code of a gRPC status name (`ERROR` for any other)."""
    return BY_STATUS.get(status, ExitCode.ERROR)


def describe(status: str, message: str, retry_after_s: float | None = None) -> str:
    """`CODE: message`, plus `(retry in 20.5 s)` when the mesh sent a RetryInfo delay."""
    text = f"{status}: {message}"
    if retry_after_s is not None:
        text += f" (retry in {format_duration(retry_after_s)})"
    return text


def fail(status: str, message: str, retry_after_s: float | None = None) -> NoReturn:
    """Prints `error: CODE: message [(retry in …)]` to stderr and exits with CODE's exit code."""
    typer.echo(f"error: {describe(status, message, retry_after_s)}", err=True)
    raise typer.Exit(exit_code(status))


def fail_error(exc: Exception) -> NoReturn:
    """Reports a `MeshError`, a gRPC `AioRpcError` (its RetryInfo read from the trailers), or
    an SDK `InfermeshError`, and exits with its code."""
    import grpc

    from services.common import errors, status

    if isinstance(exc, grpc.aio.AioRpcError):
        exc = status.from_rpc_error(exc)
    if isinstance(exc, errors.MeshError):
        fail(exc.code, exc.message, exc.retry_after_s)
    code, message = getattr(exc, "code", "UNKNOWN"), getattr(exc, "message", str(exc))
    fail(code, message, getattr(exc, "retry_after", None))


def fail_local(message: str, code: ExitCode = ExitCode.ERROR) -> NoReturn:
    """A failure meshctl found itself (no gRPC status): `error: message`, then `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
