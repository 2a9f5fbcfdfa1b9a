"""Engine replicas side by side on one machine: a Triton server and its sidecar each, on free
loopback ports, each replica in its own zone. The tests, the routing benchmark and failure drills
use this to get N real replicas registered in an etcd they already run.

`ReplicaSet.start()` returns once every Triton is ready and every sidecar answers SERVING;
`wait_registered()` then waits until etcd holds each replica's record and load report. `stop()`
drains the sidecars (SIGTERM), then stops the Triton servers; `kill()` SIGKILLs one replica's
processes, as a lost node would, and cleans up what Triton leaves behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pathlib
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import aetcd

from backends.triton.launcher import DEFAULT_MODEL_REPOSITORY, TritonPorts, TritonServer
from backends.triton.repository import REFERENCE_MODEL_DIR, render_reference_model
from deploy.local.stack import service_process, wait_serving
from services.common import etcd
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

__all__ = ["REFERENCE_MODEL_DIR", "Replica", "ReplicaSet", "reference_repository"]

def reference_repository(
    root: pathlib.Path, names: Iterable[str], parameters: Mapping[str, str] | None = None
) -> pathlib.Path:
    """A model repository at `root` holding the reference engine once per name in `names`, each
    a separate Triton model, with the config.pbtxt `parameters` given."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        render_reference_model(root, name, parameters)
    return root


@dataclass
class Replica:
    replica_id: str
    zone: str
    triton: TritonServer
    sidecar: ChildProcess
    sidecar_endpoint: str  # the sidecar's gRPC health
    sidecar_metrics: str  # host:port of the sidecar's /metrics

    @property
    def grpc_endpoint(self) -> str:
        return self.triton.grpc_address

    @property
    def metrics_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.triton.ports.metrics}"


class ReplicaSet:
    """`count` replicas named `<id_prefix>-<i>`, zones assigned round robin from `zones`."""

    def __init__(
        self,
        root: pathlib.Path,
        etcd_endpoint: str,
        count: int,
        model_repository: pathlib.Path | None = DEFAULT_MODEL_REPOSITORY,
        models: Sequence[str] | None = None,
        zones: Sequence[str] = ("zone-a", "zone-b", "zone-c"),
        id_prefix: str = "replica",
        sidecar_env: Mapping[str, str] | None = None,
    ):
        """`models` None loads every model in the repository at start; [] none (placements
        load them later). `model_repository` None gives each replica an empty repository of its
        own, into which its sidecar renders the registered versions placed on it (fetched from
        the registry: `sidecar_env` then carries the mesh token). `sidecar_env`: extra
        INFERMESH_* settings for every sidecar. The set runs in plaintext development, beside
        a development etcd (tests, the routing benchmarks), not inside a TLS stack."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if not zones:
            raise ValueError("zones must name at least one zone")
        self.root = root
        self.etcd_endpoint = etcd_endpoint
        self.replicas: list[Replica] = []
        for index in range(count):
            replica_id = f"{id_prefix}-{index}"
            workdir = root / replica_id
            repository = model_repository or workdir / "models"
            repository.mkdir(parents=True, exist_ok=True)
            triton = TritonServer(workdir / "triton", TritonPorts.free(), repository,
                                  models=models)
            port, metrics_port = free_port(), free_port()
            zone = zones[index % len(zones)]
            variables = {
                "INFERMESH_TLS_MODE": "plaintext-development",
                "INFERMESH_ETCD_ENDPOINT": etcd_endpoint,
                "INFERMESH_METRICS_PORT": str(metrics_port),
                "INFERMESH_REPLICA_ID": replica_id,
                "INFERMESH_ZONE": zone,
                "INFERMESH_TRITON_GRPC_ENDPOINT": triton.grpc_address,
                "INFERMESH_TRITON_METRICS_ENDPOINT": f"{LOOPBACK}:{triton.ports.metrics}",
                "INFERMESH_KV_EVENTS_DIR": str(triton.kv_events_dir),
                **({} if model_repository else {
                    "INFERMESH_MODEL_REPOSITORY": str(repository),
                    "INFERMESH_BLOB_CACHE_DIR": str(workdir / "blobs")}),
                **(sidecar_env or {}),
            }
            sidecar = service_process(f"sidecar-{replica_id}", "backends.triton.sidecar",
                                      workdir / "sidecar.log", port, variables)
            self.replicas.append(Replica(replica_id, zone, triton, sidecar,
                                         f"{LOOPBACK}:{port}", f"{LOOPBACK}:{metrics_port}"))

    def __getitem__(self, replica_id: str) -> Replica:
        for replica in self.replicas:
            if replica.replica_id == replica_id:
                return replica
        raise KeyError(replica_id)

    def start(self, timeout_s: float = 120.0) -> None:
        """Every Triton (loading in parallel), then every sidecar; stops all on failure."""
        deadline = time.monotonic() + timeout_s
        try:
            for replica in self.replicas:
                replica.triton.start()
            for replica in self.replicas:
                replica.triton.wait_ready(max(1.0, deadline - time.monotonic()))
            for replica in self.replicas:
                replica.sidecar.start()
            for replica in self.replicas:
                wait_serving(replica.sidecar, replica.sidecar_endpoint, deadline)
        except BaseException:
            self.stop()
            raise

    async def wait_registered(
        self, client: aetcd.Client, timeout_s: float = 30.0, models: Iterable[str] = ()
    ) -> None:
        """Until every replica's record is healthy with `models` and its load report covers
        them."""
        wanted = set(models)
        deadline = time.monotonic() + timeout_s
        waiting = {replica.replica_id for replica in self.replicas}
        while waiting:
            for replica_id in sorted(waiting):
                record = await client.get(etcd.Keys.replica(replica_id).encode())
                load = await client.get(etcd.Keys.load(replica_id).encode())
                if record is not None and load is not None:
                    value, report = etcd.decode(record.value), etcd.decode(load.value)
                    if (value["healthy"] and wanted <= set(value["models"])
                            and wanted <= set(report["models"])):
                        waiting.discard(replica_id)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"not registered with {sorted(wanted)} after {timeout_s}s: "
                                   f"{sorted(waiting)}")
            if waiting:
                await asyncio.sleep(0.1)

    def stop(self, grace_s: float = 45.0) -> None:
        """Drains every sidecar (SIGTERM, all at once), then stops every Triton in parallel."""
        for replica in self.replicas:
            if replica.sidecar.alive():
                with contextlib.suppress(ProcessLookupError):
                    replica.sidecar.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for replica in self.replicas:
            replica.sidecar.stop(grace_s)
        with concurrent.futures.ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda replica: replica.triton.stop(), self.replicas))

    def kill(self, replica_id: str) -> None:
        """SIGKILLs the replica's sidecar and Triton (a lost node): its lease expires on its own.
        Triton's orphaned stubs and shared memory are cleaned up like after any stop."""
        replica = self[replica_id]
        if replica.sidecar.alive():
            replica.sidecar.process.kill()  # type: ignore[union-attr]
            replica.sidecar.process.wait(5)  # type: ignore[union-attr]
        if replica.triton.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica.triton.pid, signal.SIGKILL)  # type: ignore[arg-type]
        replica.triton.stop()

    def __enter__(self) -> ReplicaSet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
