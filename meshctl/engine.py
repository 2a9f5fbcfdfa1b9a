"""`meshctl engine calibrate MODEL`: measure a replica of a model version, write its profile.

The version (name, name@alias or name@sha256:…) is resolved at the registry; its replica is a
Triton server (`--triton`, `INFERMESH_TRITON`, or the local stack's), spoken to with the
gateway's own Triton adapter, so what is measured is what the mesh gets. Three measurements:

- prefill: time to first token for prompts of several lengths, one request at a time;
- decode: time per generated token with 1, 2, 4 … requests decoding together;
- KV cache: blocks in use while the largest batch runs, from the engine's metrics endpoint.

The result (`backends/triton/calibration.py`) is JSON: the reference engine's step model fitted
to the measurements, its config.pbtxt parameters, and the raw samples.
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import statistics
import time
import urllib.request
import uuid

import typer
from infermesh_client import AsyncClient, InfermeshError

from backends.triton.adapter import EngineRequest, TritonAdapter
from backends.triton.calibration import EngineProfile, fit_profile
from meshctl.client import resolved_options
from meshctl.config import service_endpoint, tls_for
from meshctl.exits import fail_error
from meshctl.progress import spinner
from services.common import errors

engine_app = typer.Typer(help="Measure engines.", no_args_is_help=True)
REQUEST_TIMEOUT_S = 300.0


def _ints(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers") from None
    if len(values) < 2 or values[0] < 1:
        raise typer.BadParameter(f"{option} needs two different values of at least 1")
    return values


def _metric(metrics_endpoint: str, name: str, triton_model: str, label: str) -> float:
    """One gauge of the engine, e.g. the KV cache's `used` blocks; 0 when absent."""
    with urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{triton_model}"' in line and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Replica:
    """Timed requests to one Triton model: every request streams, every token is timed."""

    def __init__(self, adapter: TritonAdapter, endpoint: str, triton_model: str):
        self._adapter, self._endpoint, self._model = adapter, endpoint, triton_model

    async def run(self, prompt: str, max_tokens: int) -> tuple[int, float, list[float]]:
        """(prompt tokens, seconds to first token, arrival times of each new token)."""
        request = EngineRequest(
            triton_model_name=self._model, request_id=uuid.uuid4().hex, prompt=prompt,
            max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
        started = time.perf_counter()
        first, arrivals, seen, prompt_tokens = 0.0, [], 0, 0
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async for chunk in self._adapter.generate(self._endpoint, request):
                now = time.perf_counter()
                prompt_tokens = chunk.prompt_tokens or prompt_tokens
                if chunk.completion_tokens > seen:
                    first = first or now - started
                    arrivals.extend([now] * (chunk.completion_tokens - seen))
                    seen = chunk.completion_tokens
        return prompt_tokens, first, arrivals


async def _measure(
    replica: _Replica, metrics_endpoint: str, triton_model: str, prompt_lengths: list[int],
    batches: list[int], decode_tokens: int, repeats: int,
) -> dict:
    await replica.run("warm up", 2)
    prefill = []
    for length in prompt_lengths:
        runs = [await replica.run("lighthouse " * length, 1) for _ in range(repeats)]
        prefill.append((runs[0][0], statistics.median(r[1] for r in runs)))
    decode = []
    most_used = 0.0
    for batch in batches:
        tasks = [asyncio.create_task(replica.run("Tell me about the sea.", decode_tokens))
                 for _ in range(batch)]
        while not all(t.done() for t in tasks):
            used = await asyncio.to_thread(_metric, metrics_endpoint,
                                           "nv_trt_llm_kv_cache_block_metrics", triton_model,
                                           'kv_cache_block_type="used"')
            if batch == batches[-1]:
                most_used = max(most_used, used)
            await asyncio.sleep(0.05)
        results = [t.result() for t in tasks]
        # Inter-token gaps after the first token: each is one decode step at this batch size.
        gaps = [b - a for _, _, times in results for a, b in itertools.pairwise(times)]
        decode.append((batch, statistics.median(gaps)))
    prompt_tokens = results[0][0]
    return {"prefill": prefill, "decode": decode, "most_used": most_used,
            "request_tokens": prompt_tokens + decode_tokens}


@engine_app.command("calibrate")
def calibrate(
    model: str = typer.Argument(..., help="name, name@alias or name@sha256:<hex>"),
    out: pathlib.Path = typer.Option(pathlib.Path("engine-profile.json"), "--out",
                                     help="Where the profile (JSON) is written."),
    prompt_lengths: str = typer.Option("16,128,512", "--prompt-lengths",
                                       help="Prompt lengths (words) for the prefill curve."),
    batches: str = typer.Option("1,2,4,8", "--batches", help="Batch sizes for the decode curve."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", min=4,
                                      help="Tokens each decode request generates."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Prefill runs per prompt length."),
    registry: str = typer.Option(None, "--registry", help="host:port [env INFERMESH_REGISTRY]"),
    triton: str = typer.Option(None, "--triton", help="host:port [env INFERMESH_TRITON]"),
    triton_metrics: str = typer.Option(
        None, "--triton-metrics", help="host:port [env INFERMESH_TRITON_METRICS]"),
    api_key: str = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]"),
) -> None:
    """Measure a replica of MODEL's version and write its engine profile."""
    lengths, sizes = _ints(prompt_lengths, "--prompt-lengths"), _ints(batches, "--batches")
    triton_endpoint = service_endpoint("triton", triton)
    metrics_endpoint = service_endpoint("triton-metrics", triton_metrics)

    async def measure() -> EngineProfile:
        async with AsyncClient(**resolved_options("registry", registry, api_key)) as client:
            version = await client.registry.version(model)
        triton_model = version.triton_model_name
        adapter = TritonAdapter(tls_for("triton", triton))
        try:
            found = await _measure(_Replica(adapter, triton_endpoint, triton_model),
                                   metrics_endpoint, triton_model, lengths, sizes, decode_tokens,
                                   repeats)
        finally:
            await adapter.close()
        tokens_per_block = int(_metric(metrics_endpoint, "nv_trt_llm_kv_cache_block_metrics",
                                       triton_model, 'kv_cache_block_type="tokens_per"'))
        max_active = int(_metric(metrics_endpoint, "nv_trt_llm_request_metrics", triton_model,
                                 'request_type="max"'))
        return fit_profile(
            model=version.model, version_id=version.version_id,
            triton_model_name=triton_model, prefill=found["prefill"], decode=found["decode"],
            max_active_requests=max_active, kv_tokens_per_block=tokens_per_block,
            kv_blocks_per_request=round(found["most_used"] / sizes[-1], 2),
            kv_request_tokens=found["request_tokens"],
        )  # fmt: skip

    try:
        with spinner(f"measuring {model}: prefill at {len(lengths)} prompt lengths, decode at "
                     f"{len(sizes)} batch sizes"):
            profile = asyncio.run(measure())
    except (errors.MeshError, InfermeshError) as exc:
        fail_error(exc)
    out.write_text(profile.to_json() + "\n")
    typer.echo(
        f"{profile.model} ({profile.version_id[:19]}): prefill {profile.prefill_us_per_token:.0f}"
        f" µs/token; decode step {profile.decode_step_ms:.1f} ms + "
        f"{profile.decode_step_ms_per_request:.2f} ms/request; "
        f"{profile.kv_blocks_per_request:g} KV blocks of {profile.kv_tokens_per_block} tokens per "
        f"{profile.kv_request_tokens}-token request → {out}")
