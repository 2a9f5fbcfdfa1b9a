"""More gateways beside a running embedded stack: the same etcd, their own ports.

Gateways are stateless and follow etcd through watches, so anything that must hold "at every
gateway" (a rollback, a key revocation) is checked against two or more of them.
"""

from __future__ import annotations

import pathlib
import time
import uuid

from deploy.local.stack import StackInfo, service_process, wait_serving
from services.common.net import LOOPBACK, free_port


class ExtraGateway:
    """One more `python -m services.gateway`; `start()` returns once it answers SERVING."""

    def __init__(self, stack: StackInfo, state_dir: pathlib.Path, name: str = "gateway-2",
                 settings: dict[str, str] | None = None, repo_root: pathlib.Path | None = None):
        """`settings`: extra INFERMESH_* variables for this gateway (e.g. a small capacity);
        `repo_root`: another checkout to run it from (its protobuf code generated), e.g. the
        previous commit's, to compare a change A/B on one stack. Tracing is off unless the
        settings name an OTLP endpoint: these gateways' real generations take the untraced path
        (no interceptors, no traced relay)."""
        self.port, self.metrics_port = free_port(), free_port()
        variables = {
            "OTEL_SDK_DISABLED": str("OTEL_EXPORTER_OTLP_ENDPOINT" not in (settings or {})).lower(),
            "INFERMESH_ETCD_ENDPOINT": stack.etcd,
            "INFERMESH_METRICS_PORT": str(self.metrics_port),
            "INFERMESH_INSTANCE_ID": f"{name}-{uuid.uuid4().hex[:6]}",
            "INFERMESH_BLOB_CACHE_DIR": str(state_dir / "data" / f"{name}-blobs"),
            "INFERMESH_AUDIT_SPOOL_DIR": str(state_dir / "data" / f"{name}-audit-spool"),
            **stack.service_security("gateway"),
            **(settings or {}),
        }
        self._stack = stack
        self.process = service_process(name, "services.gateway",
                                       state_dir / "logs" / f"{name}.log", self.port, variables)
        if repo_root is not None:
            self.process.cwd = repo_root

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def metrics(self) -> str:
        return f"{LOOPBACK}:{self.metrics_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.process.start()
        try:
            wait_serving(self.process, self.endpoint, time.monotonic() + timeout_s,
                         self._stack.client_tls())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.stop(grace_s=10.0)
