"""Triton's model control, kept to the replica's own sidecar.

Triton's mutual TLS admits any certificate of the mesh's CA, and gateways must reach its gRPC
port for generations; Triton has no per-identity authorization. So its control protocols
(loading models with file overrides is running code on the replica) are restricted to calls
carrying a header whose value only this replica's Triton and sidecar know: a token made fresh
for each replica when it starts (`python -m backends.triton.control FILE` in the pod's init
container; the local stack's own start), kept in an owner-only file neither ever logs.
Health, metadata and inference stay open to any mesh certificate.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import sys
from collections.abc import Sequence

# gRPC metadata keys are lowercase; Triton compares the header's value exactly.
CONTROL_HEADER = "infermesh-control"
# Triton (2.51) looks for a restricted protocol's gRPC header under this prefix (its refusal
# names the key it expected); HTTP takes the key as given.
GRPC_PREFIX = "triton-grpc-protocol-"
RESTRICTED = ("model-repository", "model-config", "shared-memory", "statistics", "trace",
              "logging")


def restriction_flags(token: str) -> list[str]:
    """tritonserver's flags that refuse the control protocols, on gRPC and on HTTP, to a call
    without `CONTROL_HEADER: token`."""
    rule = f"{','.join(RESTRICTED)}:{CONTROL_HEADER}={token}"
    return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]


def control_headers(token: str | None) -> dict[str, str] | None:
    """The gRPC headers of a control call (None without a token: an unrestricted Triton)."""
    return None if token is None else {GRPC_PREFIX + CONTROL_HEADER: token}


def write_token(path: pathlib.Path) -> None:
    """A new random token in `path`, readable by its owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_urlsafe(32))


def read_token(path: pathlib.Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"Triton's control token file {path} is empty")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m backends.triton.control FILE`: writes a replica's token before Triton starts."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m backends.triton.control FILE", file=sys.stderr)
        return 2
    write_token(pathlib.Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
