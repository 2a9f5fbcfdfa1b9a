"""`python -m services.common.probe KIND`: a container's own check of its gRPC health, for
Kubernetes exec probes.

Kubelet's built-in gRPC probe speaks plaintext only, and every mesh listener is TLS (internal
ones demand a client certificate), so the probe runs inside the container and dials the service
on loopback with the container's own identity (its `INFERMESH_TLS_*` files), checking that the
server is `KIND`. Exits 0 when the service answers SERVING, 1 otherwise (the reason on stderr).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls
from services.common.net import LOOPBACK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.probe",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("kind", help="the service's kind, as in its certificate (gateway, ...)")
    parser.add_argument("--port", type=int, default=50051, help="its gRPC port")
    parser.add_argument("--timeout-s", type=float, default=4.0, help="the check's deadline")
    args = parser.parse_args(argv)
    mesh_tls = tls.MeshTls.load(tls.TlsSettings())
    with tls.blocking_channel(f"{LOOPBACK}:{args.port}", args.kind, mesh_tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"{args.kind} on port {args.port}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{args.kind} on port {args.port}: "
              f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
