"""The torch engine's throughput three ways, in one run: through the mesh, straight to Triton, and
the same model in this process with transformers (the engine's own limit on this machine).

Every request streams `max_tokens` tokens exactly (min_tokens = max_tokens, seeded sampling), so
all three paths do the same work; at each concurrency the same number of requests runs on each.
The in-process engine is loaded from the stack's own verified blobs and converted copy, with the
version's KV-cache config; at each concurrency the three paths run back to back, one at a time
(the idle engines cost no CPU), so a drifting machine load biases none of them.
"""

from __future__ import annotations

import asyncio
import pathlib
import statistics
import time
from collections.abc import Callable

from backends.triton.adapter import TritonAdapter
from backends.triton.torch_engine import Generation, Sampling, TorchEngine, TorchEngineConfig
from backends.triton.weights import (
    cache_root,
    materialize_files,
    materialize_weights,
    publish_default_model,
)
from bench.streaming import (
    LevelResult,
    Sample,
    direct_client,
    drive,
    mesh_client,
    percentile,
    served_triton_model,
)
from deploy.local.demo_models import manifest_dict, torch_manifest
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2_grpc
from services.registry.blobs import LocalBlobStore

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PATHS = ("mesh", "direct", "inprocess")
TEMPERATURE = 0.8
REQUEST_TIMEOUT_S = 300  # beyond the budget: a slow CPU makes requests slow, not failed


def level_result(label: str, concurrency: int, samples: list[Sample],
                 elapsed: float) -> LevelResult:
    """A level's figures from its samples; each distinct failure is printed once."""
    good = [s for s in samples if s.ok]
    for error in sorted({s.error for s in samples if not s.ok}):
        print(f"{label} c{concurrency}: failed: {error}", flush=True)
    ttfts = [s.ttft_s * 1000 for s in good]
    return LevelResult(
        concurrency=concurrency, requests=len(samples), errors=len(samples) - len(good),
        tokens_per_s=sum(s.tokens for s in good) / elapsed,
        ttft_p50_ms=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_p99_ms=percentile(ttfts, 99),
    )


async def _over_grpc(path: str, stack: StackInfo, triton_model: str, concurrency: int,
                     requests: int, max_tokens: int, budget_s: float) -> LevelResult:
    if path == "direct":
        adapter = TritonAdapter(stack.client_tls())
        try:
            client = direct_client(adapter, stack, max_tokens, triton_model, PROMPT,
                                   min_tokens=max_tokens, temperature=TEMPERATURE)
            samples, elapsed = await drive(client, concurrency, range(requests), budget_s)
        finally:
            await adapter.close()
    else:
        async with stack.channel() as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            client = mesh_client(stub, stack, max_tokens, stack.model, PROMPT,
                                 timeout_s=budget_s + REQUEST_TIMEOUT_S,
                                 min_tokens=max_tokens, temperature=TEMPERATURE)
            samples, elapsed = await drive(client, concurrency, range(requests), budget_s)
    return level_result(f"torch {path}", concurrency, samples, elapsed)


def free_generation(request_id: str, number: int, max_tokens: int) -> Generation:
    """Seeded sampling at `TEMPERATURE`, EOS banned: exactly `max_tokens` tokens."""
    return Generation(request_id, PROMPT, max_tokens, Sampling(
        temperature=TEMPERATURE, seed=number, min_tokens=max_tokens))


def drive_engine(engine: TorchEngine, concurrency: int, requests: int, max_tokens: int,
                 generation: Callable[[str, int, int], Generation] = free_generation,
                 label: str = "torch inprocess") -> LevelResult:
    """Keeps `concurrency` requests in the engine until `requests` have finished; each request
    (`generation(request_id, number, max_tokens)`) must stream exactly `max_tokens` tokens."""
    started: dict[str, float] = {}
    first: dict[str, float] = {}
    samples: list[Sample] = []
    submitted = 0
    begin = time.perf_counter()
    while len(samples) < requests:
        while submitted < requests and len(started) - len(samples) < concurrency:
            request_id = f"bench-{submitted}"
            started[request_id] = time.perf_counter()
            engine.submit(generation(request_id, submitted, max_tokens))
            submitted += 1
        for delta in engine.poll(0.05):
            if delta.text and delta.request_id not in first:
                first[delta.request_id] = time.perf_counter()
            if delta.finish_reason is not None:
                ttft = first.get(delta.request_id, time.perf_counter()) - started[delta.request_id]
                ok = delta.error == "" and delta.num_output_tokens == max_tokens
                samples.append(Sample(ttft, delta.num_output_tokens, ok,
                                      delta.error or "ended before max_tokens"))
    return level_result(label, concurrency, samples, time.perf_counter() - begin)


def _load_engine(stack_blob_dir: pathlib.Path) -> TorchEngine:
    """The stack's demo model, from the same verified blobs, with the same engine config."""
    blobs = LocalBlobStore(stack_blob_dir)
    cache = cache_root()
    manifest = manifest_dict(torch_manifest(publish_default_model(blobs, cache)))
    engine_config = manifest["engine"]
    engine = TorchEngine(
        materialize_weights(blobs, manifest["weights"], cache),
        materialize_files(blobs, manifest["tokenizer_files"], cache),
        TorchEngineConfig(num_blocks=engine_config["num_blocks"],
                          page_size=engine_config["page_size"],
                          max_batch_tokens=engine_config["max_batch_tokens"],
                          dtype=engine_config["dtype"]),
    )
    engine.start()
    return engine


def compare(stack: StackInfo, stack_blob_dir: pathlib.Path, levels: tuple[int, ...] = (1, 8),
            max_tokens: int = 64, requests_per_stream: int = 2, budget_s: float = 120.0,
            min_requests: int = 4, warmup_tokens: int = 8) -> dict[str, float]:
    """Figures named `torch_<path>_…_c<N>` plus the two ratios the issue asks for; every path
    is first warmed with two requests of `warmup_tokens` tokens."""
    triton_model = served_triton_model(stack, stack.model)
    results: dict[tuple[str, int], LevelResult] = {}
    engine = _load_engine(stack_blob_dir)  # idle while the Triton paths run
    try:
        for path in ("direct", "mesh"):  # warm
            asyncio.run(_over_grpc(path, stack, triton_model, 2, 2, warmup_tokens, budget_s))
        drive_engine(engine, 2, 2, warmup_tokens)
        for concurrency in levels:  # the three paths back to back, so load drifts alike
            requests = max(min_requests, concurrency * requests_per_stream)
            for path in ("direct", "mesh"):
                results[path, concurrency] = asyncio.run(_over_grpc(
                    path, stack, triton_model, concurrency, requests, max_tokens, budget_s))
            results["inprocess", concurrency] = drive_engine(engine, concurrency, requests,
                                                            max_tokens)
    finally:
        engine.stop()
    figures: dict[str, float] = {}
    for (path, concurrency), result in sorted(results.items()):
        c = f"c{concurrency}"
        print(f"torch {path:>9} {c:>3}: {result.tokens_per_s:7.1f} tok/s, ttft p50 "
              f"{result.ttft_p50_ms:7.1f} ms ({result.requests} req, {result.errors} err)",
              flush=True)
        figures[f"torch_{path}_tokens_per_s_{c}"] = round(result.tokens_per_s, 1)
        figures[f"torch_{path}_ttft_p50_ms_{c}"] = round(result.ttft_p50_ms, 1)
        figures[f"torch_errors_{path}_{c}"] = result.errors
    for concurrency in levels:
        c = f"c{concurrency}"
        mesh, direct, local = (results[p, concurrency].tokens_per_s for p in PATHS)
        figures[f"torch_mesh_over_direct_tokens_per_s_{c}"] = round(mesh / direct, 3)
        figures[f"torch_direct_over_inprocess_tokens_per_s_{c}"] = round(direct / local, 3)
    return figures

