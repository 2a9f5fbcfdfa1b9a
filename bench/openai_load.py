"""The OpenAI HTTP front under NVIDIA's `aiperf`, against the same workload through gRPC.

`aiperf` (the field's load tool for OpenAI endpoints) streams completions from the gateway's
HTTP port at concurrency 16; then our own gRPC client sends the same prompts, with the same
output length, through `GenerateStream`. Both reach the same pipeline and the same reference
engine, so the ratio is what the HTTP front (JSON, SSE, uvicorn) costs beside the gRPC one.
The two clients differ (aiperf runs its own worker processes; ours is one asyncio process
with two workers' worth of streams), which `docs/benchmarks.md` discusses.

`aiperf` pulls 1.2 GB of its own pins (ENVIRONMENT.md), so it lives in its own virtual
environment, `.venv-aiperf`, made on first use from `AIPERF` (`bench/tool_venv.py`; the smoke
run never uses it); when it cannot be had the HTTP figures are left out and the reason printed,
and the gRPC half and the rest of `make bench` still run.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from backends.triton.reference_engine import CORPUS
from backends.triton.weights import cache_root, materialize_weights, publish_default_model
from bench.streaming import Sample, drive, mesh_client, percentile
from bench.tool_venv import tool_executable
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2_grpc
from services.registry.blobs import LocalBlobStore

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
AIPERF = "aiperf==0.13.0"
AIPERF_VENV = REPO_ROOT / ".venv-aiperf"
CONCURRENCY = 16
REQUESTS = 200
WARMUP_REQUESTS = 16
OUTPUT_TOKENS = 64
PROMPTS = 32
PROMPT_WORDS = 100
RUN_TIMEOUT_S = 300


def prompts() -> list[str]:
    """Distinct prompts of `PROMPT_WORDS` words (the reference engine's tokens) each."""
    words = " ".join(CORPUS).split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(PROMPT_WORDS))
            for i in range(PROMPTS)]


def tokenizer_dir(state_dir: pathlib.Path) -> pathlib.Path:
    """A Hugging Face tokenizer folder aiperf can load offline (the default model's); with
    `--use-server-token-count` it only shapes aiperf's bookkeeping, not the counts."""
    blobs = LocalBlobStore(state_dir / "data" / "blobs")
    files = publish_default_model(blobs, cache_root())
    return materialize_weights(blobs, files.weights, cache_root())


def run_aiperf(executable: pathlib.Path, stack: StackInfo, state_dir: pathlib.Path,
               texts: list[str], requests: int, warmup_requests: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="aiperf-") as scratch:
        scratch_dir = pathlib.Path(scratch)
        dataset = scratch_dir / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        artifacts = scratch_dir / "artifacts"
        command = [
            str(executable), "profile", "--model", stack.reference_model,
            "--tokenizer", str(tokenizer_dir(state_dir)),
            "--url", stack.openai_base_url.removesuffix("/v1"), "--api-key", stack.api_key,
            "--endpoint-type", "completions", "--streaming",
            "--concurrency", str(CONCURRENCY), "--request-count", str(requests),
            # A rate far above what 16 streams reach keeps the concurrency and stops aiperf's
            # timer from busy-spinning a core (ENVIRONMENT.md).
            "--request-rate", "1000", "--arrival-pattern", "constant",
            # aiperf refuses a warm-up of 0 requests (the smoke's): then none is asked for.
            *(["--warmup-request-count", str(warmup_requests)] if warmup_requests else []),
            "--custom-dataset-type", "single_turn", "--input-file", str(dataset),
            "--extra-inputs", f"max_tokens:{OUTPUT_TOKENS}", f"min_tokens:{OUTPUT_TOKENS}",
            "--use-server-token-count", "--random-seed", "42",
            "--ui", "none", "--no-gpu-telemetry", "--no-server-metrics",
            "--artifact-dir", str(artifacts),
        ]
        # Not HF_HUB_OFFLINE (the torch engine's bench sets it in this process): offline,
        # aiperf takes a tokenizer *path* for a Hub repo id and refuses it.
        # The stack's https front is verified against its CA (aiperf's HTTP client reads the
        # trust store from SSL_CERT_FILE, as OpenSSL does).
        trust = ({"SSL_CERT_FILE": stack.client_env()["INFERMESH_TLS_CA_FILE"]}
                 if stack.tls_dir else {})
        env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"},
               "TMPDIR": scratch, **trust}
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=RUN_TIMEOUT_S, check=False)
        summary_path = artifacts / "profile_export_aiperf.json"
        if result.returncode != 0 or not summary_path.exists():
            raise RuntimeError(f"aiperf failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        summary = json.loads(summary_path.read_text())
    errors = summary.get("error_summary") or []
    return {
        "tokens_per_s": float(summary["output_token_throughput"]["avg"]),
        "ttft_p50_ms": float(summary["time_to_first_token"]["p50"]),
        "ttft_p99_ms": float(summary["time_to_first_token"]["p99"]),
        "errors": float(sum(int(e.get("count", 0)) for e in errors)),
    }


async def run_grpc(stack: StackInfo, texts: list[str], requests: int, warmup_requests: int
                   ) -> dict[str, float]:
    """The same prompts and output length through `GenerateStream`, at the same concurrency."""
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        clients = [mesh_client(stub, stack, OUTPUT_TOKENS, prompt=text,
                               min_tokens=OUTPUT_TOKENS) for text in texts]

        async def one(index: int) -> Sample:
            return await clients[index % len(clients)](index)

        await drive(one, CONCURRENCY, range(warmup_requests), RUN_TIMEOUT_S)
        started = time.perf_counter()
        samples, _ = await drive(one, CONCURRENCY, range(requests), RUN_TIMEOUT_S)
        elapsed = time.perf_counter() - started
    good = [s for s in samples if s.ok]
    ttfts = [s.ttft_s * 1000 for s in good]
    return {
        "tokens_per_s": sum(s.tokens for s in good) / elapsed,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "errors": float(len(samples) - len(good)),
    }


def run(stack: StackInfo, state_dir: pathlib.Path, requests: int = REQUESTS,
        warmup_requests: int = WARMUP_REQUESTS, aiperf: bool = True) -> dict[str, float]:
    """aiperf over HTTP (when `aiperf` and it can be had), then gRPC. The smoke runs without
    it: it checks our code, and aiperf is a 1.2 GB tool of its own."""
    texts = prompts()
    executable = (tool_executable(AIPERF, AIPERF_VENV, "aiperf") if aiperf
                  else "this run does not use aiperf")
    http = None
    if isinstance(executable, str):
        print(f"openai load: aiperf skipped: {executable}", file=sys.stderr, flush=True)
    else:
        http = run_aiperf(executable, stack, state_dir, texts, requests, warmup_requests)
    rpc = asyncio.run(run_grpc(stack, texts, requests, warmup_requests))
    print(f"c{CONCURRENCY}: gRPC {rpc['tokens_per_s']:8.1f} tok/s ttft p50 "
          f"{rpc['ttft_p50_ms']:7.1f} p99 {rpc['ttft_p99_ms']:7.1f} ms ({rpc['errors']:.0f} err)"
          + ("" if http is None else
             f" | aiperf over HTTP {http['tokens_per_s']:8.1f} tok/s ttft p50 "
             f"{http['ttft_p50_ms']:7.1f} p99 {http['ttft_p99_ms']:7.1f} ms "
             f"({http['errors']:.0f} err)"), flush=True)
    c = f"c{CONCURRENCY}"
    figures = {
        f"grpc_tokens_per_s_{c}": round(rpc["tokens_per_s"], 1),
        f"grpc_ttft_p50_ms_{c}": round(rpc["ttft_p50_ms"], 2),
        f"grpc_errors_{c}": rpc["errors"],
    }
    if http is not None:
        figures.update({
            f"http_tokens_per_s_{c}": round(http["tokens_per_s"], 1),
            f"http_over_grpc_tokens_per_s_{c}":
                round(http["tokens_per_s"] / rpc["tokens_per_s"], 3),
            f"http_ttft_p50_ms_{c}": round(http["ttft_p50_ms"], 2),
            f"http_added_ttft_p50_ms_{c}": round(http["ttft_p50_ms"] - rpc["ttft_p50_ms"], 2),
            f"http_errors_{c}": http["errors"],
        })
    return figures


if __name__ == "__main__":
    from bench.__main__ import BENCH_PLAN
    from deploy.local.stack import Stack, StackOptions

    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        running = Stack(StackOptions(state_dir=pathlib.Path(state), demo_plan=BENCH_PLAN))
        info = running.up()
        try:
            print(json.dumps(run(info, pathlib.Path(state)), sort_keys=True))
        finally:
            running.down()
