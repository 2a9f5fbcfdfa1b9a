"""What a replica dying mid-stream costs a client (issue 22), on real parts of its own: etcd, two
reference replicas (Triton and sidecar each), a scheduler, and the gateway's pipeline in this
process with its real scheduler client and Triton adapter. `streams` generations of `tokens`
tokens start together; once the first has `cut_at` tokens, the replica serving it is SIGKILLed
(Triton and sidecar, a lost node). The moved streams continue on the other replica.

- `failover_pause_ms_p50` / `_p99`: over the moved streams, the gap between the last text before
  the kill and the first after it (what the client sees as a pause).
- `failover_completed_fraction`: generations that ended well with their uncut text (goal 1.0).

    python -m bench.midstream_failover [--streams 8] [--tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from backends.triton.adapter import TritonAdapter
from backends.triton.reference_engine import GenerationRequest as EngineGeneration
from backends.triton.reference_engine import complete
from bench.streaming import percentile
from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet, reference_repository
from deploy.local.stack import service_process, wait_serving
from services.common import etcd
from services.common.discovery import ServiceDirectory
from services.common.net import free_port
from services.common.tenancy import TenantPlan
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.failover import FailoverSettings
from services.gateway.peers import Grant, SchedulerClient
from services.gateway.pipeline import GenerationPipeline, TokenText
from services.gateway.requests import GenerationRequest, Principal, SamplingRequest
from services.gateway.shadow import ShadowTraffic
from services.gateway.tokenizers import TokenizerStore
from services.gateway.validation import Limits
from services.registry.blob_cache import BlobCache
from services.registry.catalog import ModelCatalog
from services.registry.manifest import served_model_name, version_id
from services.registry.rollout import Routing

MANIFEST = {
    "name": "failover-bench", "description": "mid-stream failover", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 1024,
               "max_batch_size": 32},
    "sampling": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0},
    "cost_per_1k_input_tokens": 0.1, "cost_per_1k_output_tokens": 0.2,
}
MODEL = served_model_name(MANIFEST["name"], version_id(MANIFEST))
PREFIX = "failover-bench"


class _Admission:
    """Quota is not what is measured: every generation gets its slot."""

    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        return Grant(slot_id=request_id, max_tokens=output_tokens)

    async def release_slot(self, tenant, slot_id, input_used, output_used):
        return None


class _NoAudit:
    def emit(self, event) -> None:
        return None


class _FirstRoutes(SchedulerClient):
    """The real client, remembering the replica each generation was first routed to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first: dict[str, str] = {}

    async def route(self, triton_model_name, version_id, request_id, *args, **kwargs):
        route = await super().route(triton_model_name, version_id, request_id, *args, **kwargs)
        self.first.setdefault(request_id, route.replica_id)
        return route


async def _no_download(digest: str, offset: int) -> AsyncIterator[bytes]:
    raise RuntimeError(f"the whitespace tokenizer has no files to fetch, yet {digest} was asked")
    yield b""  # makes this an async generator


async def _measure(etcd_endpoint: str, replicas: ReplicaSet, streams: int, tokens: int,
                   cut_at: int, root: pathlib.Path) -> dict[str, Any]:
    async with etcd.connect(etcd_endpoint, 5.0) as client:
        await replicas.wait_registered(client, models=[MODEL])
        directory = ServiceDirectory(client, None)
        await directory.start()
        adapter = TritonAdapter(None)
        routing = _FirstRoutes(directory, 2.0)
        catalog = ModelCatalog()
        vid = version_id(MANIFEST)
        catalog.rebuild({f"failover-bench/versions/{vid}": {"version_id": vid,
                                                            "manifest": MANIFEST},
                         "failover-bench/routing": Routing(revision=1,
                                                           production=vid).to_record()})
        blobs = root / "blobs"
        pipeline = GenerationPipeline(
            catalog, _Admission(), routing, adapter, _NoAudit(), Limits(),
            FairAdmission(AdmissionLimits()),
            shadow=ShadowTraffic(routing, adapter, max_in_flight=1, timeout_s=5.0),
            tokenizers=TokenizerStore(BlobCache(blobs, 1 << 20, _no_download), blobs),
            source="gateway/failover-bench", failover=FailoverSettings(max_moves=2))
        requests = [GenerationRequest(
            request_id=f"bench-{n}", model="failover-bench",
            prompt=f"Bench stream {n}: a long story about the harbour.",
            sampling=SamplingRequest(max_tokens=tokens, min_tokens=tokens,
                                     temperature=0.8 if n % 2 else 0.0,
                                     seed=100 + n if n % 2 else None)) for n in range(streams)]
        arrivals: dict[str, list[tuple[float, str]]] = {r.request_id: [] for r in requests}

        def sender(request_id: str):
            async def send(event) -> None:
                if isinstance(event, TokenText):
                    arrivals[request_id].append((time.monotonic(), event.text))
            return send

        principal = Principal("bench", "k", "user", TenantPlan())
        try:
            async with asyncio.timeout(120):
                runs = [asyncio.create_task(pipeline.run(principal, r, sender(r.request_id)))
                        for r in requests]
                first = requests[0].request_id
                while first not in routing.first or len(arrivals[first]) < cut_at:
                    await asyncio.sleep(0.005)
                victim = routing.first[first]
                killed_at = time.monotonic()
                await asyncio.to_thread(replicas.kill, victim)
                finished = await asyncio.gather(*runs)
        finally:
            await pipeline.drain_background()
            await routing.close()
            await adapter.close()
            await directory.close()
    pauses, completed = [], 0
    for request, final in zip(requests, finished, strict=True):
        got = arrivals[request.request_id]
        uncut = complete(EngineGeneration(0, request.prompt or "", tokens,
                                          request.sampling.seed or 0, min_tokens=tokens)).text
        if final.error is None and "".join(text for _, text in got) == uncut:
            completed += 1
        if routing.first[request.request_id] == victim:
            before = [t for t, _ in got if t <= killed_at]
            after = [t for t, _ in got if t > killed_at]
            if before and after:
                pauses.append((min(after) - max(before)) * 1000)
    return {"failover_pause_ms_p50": round(percentile(pauses, 50), 1),
            "failover_pause_ms_p99": round(percentile(pauses, 99), 1),
            "failover_completed_fraction": round(completed / len(requests), 3),
            "failover_moved_streams": len(pauses)}


def run(streams: int = 8, tokens: int = 200, cut_at: int = 50,
        decode_step_ms: float = 12.0) -> dict[str, Any]:
    """Starts its own etcd, two replicas and a scheduler; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="infermesh-failover-bench-") as directory:
        root = pathlib.Path(directory)
        etcd_server = EtcdServer(root / "etcd", root / "etcd.log")
        etcd_server.start()
        try:
            repository = reference_repository(root / "models", [MODEL],
                                              {"decode_step_ms": str(decode_step_ms)})
            replicas = ReplicaSet(root / "replicas", etcd_server.endpoint, 2, repository,
                                  models=[MODEL], zones=("zone-a",), id_prefix=PREFIX)
            port = free_port()
            scheduler = service_process(
                "scheduler-failover-bench", "services.scheduler", root / "scheduler.log", port,
                {"INFERMESH_TLS_MODE": "plaintext-development",
                 "INFERMESH_ETCD_ENDPOINT": etcd_server.endpoint,
                 "INFERMESH_ROUTING_POLICY": "least_loaded",
                 "INFERMESH_PLACEMENT_ENABLED": "false"})
            replicas.start()
            try:
                scheduler.start()
                try:
                    wait_serving(scheduler, f"127.0.0.1:{port}", time.monotonic() + 30)
                    return asyncio.run(_measure(etcd_server.endpoint, replicas, streams,
                                                tokens, cut_at, root))
                finally:
                    scheduler.stop()
            finally:
                replicas.stop()
        finally:
            etcd_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(streams=args.streams, tokens=args.tokens)))


if __name__ == "__main__":
    main()
