"""`make bench`: starts its own embedded stack, runs every benchmark, prints one JSON line last.

The last line holds every figure under stable names, so runs can be compared by machine; the
run fails (after printing it) when a headline figure is missing from it, or null without its
reason under `unmeasured`.

`--smoke` (or INFERMESH_BENCH_SMOKE=1) runs every benchmark once with tiny counts and short
durations (`SMOKE`): no figure means anything then, but every step must still finish, with no
failed request, and the last line must hold every headline figure. `make test` runs it
(tests/e2e/test_bench_smoke.py), so a benchmark cannot silently stop working.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from bench import (
    audit,
    engine_limit,
    failover,
    gateway_throughput,
    litellm_peer,
    midstream_failover,
    noisy_neighbor,
    openai_load,
    quota_accuracy,
    response_cache,
    rollback,
    routing,
    structured_output,
    tls_cost,
    torch_engine,
    tracing_cost,
    versions,
)
from bench.streaming import compare
from deploy.local.stack import Stack, StackOptions
from services.common.tenancy import TenantPlan

# The benchmark tenant must not be what limits the measurement.
BENCH_PLAN = TenantPlan(requests_per_minute=1_000_000, input_tokens_per_minute=10**9,
                        output_tokens_per_minute=10**9, max_concurrency=1024)

SMOKE_ENV = "INFERMESH_BENCH_SMOKE"

# Keyword arguments for each benchmark's entry point in a smoke run; a full run uses each one's
# own defaults (and the command line's, for streaming). Every step still runs, on fewer
# replicas, gateways and requests; every load loop is bounded in count and time.
SMOKE: Mapping[str, Mapping[str, Any]] = {
    "routing": {"rate_per_s": 4.0, "duration_s": 1.0, "replica_count": 2, "warmup_s": 0.0,
                "decision_samples": 200, "rpc_samples": 50, "stream_samples": 200,
                "disruptions": False},
    "streaming": {"levels": (1, 16), "max_tokens": 4, "requests_per_stream": 1,
                  "budget_s": 30.0, "min_requests": 2, "warmup_requests": 2},
    "torch_engine": {"levels": (1,), "max_tokens": 4, "requests_per_stream": 1,
                     "min_requests": 1, "warmup_tokens": 2},
    "gateway_throughput": {"concurrency": 4, "duration_s": 1.0, "warmup_s": 0.5},
    "engine_limit": {"levels": (1, 8), "max_tokens": 2, "requests_per_stream": 1, "rounds": 1,
                     "warmup_tokens": 2},
    "noisy_neighbor": {"phase_s": 1.5, "decisions": 50},
    "quota_accuracy": {"gateways": 2, "workers": 2, "warmup_s": 0.5, "window_s": 1.0},
    "rollback": {"rounds": 1, "cli_rounds": 1},
    "audit": {"levels": (1, 8), "duration_s": 0.3, "warmup_s": 0.2},
    "openai_load": {"requests": 16, "warmup_requests": 0, "aiperf": False},
    "litellm_peer": {"samples": 2, "warmup": 1, "litellm": False},
    "failover": {"requests": 5, "window_s": 3.0, "concurrency": 2},
    "midstream_failover": {"streams": 4, "tokens": 40, "cut_at": 10},
    # A few MB on the reference engine instead of the real model's ~540 MB (bench/versions.py).
    "versions": {"engine": "reference", "rounds": 1},
    "tls_cost": {"max_tokens": 4, "requests_per_stream": 1, "min_requests": 2,
                 "budget_s": 30.0, "warmup_requests": 2},
    "tracing_cost": {"max_tokens": 4, "requests_per_stream": 1, "min_requests": 2,
                     "budget_s": 30.0, "warmup_requests": 2},
    "response_cache": {"samples": 2, "max_tokens": 4},
    "structured_output": {"concurrency": 8, "max_tokens": 4, "requests_per_stream": 1,
                          "rounds": 1, "warmup_tokens": 2},
}

# What every run's last line must hold, smoke or full: each benchmark's headline figures. A figure
# may be null only when the run says why under UNMEASURED (e.g. LiteLLM's in a smoke run, which
# does not install that peer).
HEADLINE = (
    "kv_routing_p90_ttft_speedup_vs_rr", "routing_kv_aware_prefix_hit_rate",
    "precise_p90_ttft_speedup_vs_approximate", "precise_p90_ttft_speedup_vs_rr",
    "kv_event_lag_ms_p99", "routing_precise_prefix_hit_rate",
    "route_decision_us_p99_100_replicas", "route_rpc_routes_per_s_16_callers",
    "route_decisions_per_s_one_process", "route_stream_over_rpc_routes_per_s_16_callers",
    "added_ttft_p50_ms_c1", "mesh_over_direct_tokens_per_s_c1",
    "added_ttft_p50_ms_c16", "added_ttft_p99_ms_c16", "mesh_over_direct_tokens_per_s_c16",
    "gateway_generations_per_s_one_process", "gateway_cpu_us_per_generation",
    "gateway_cpu_us_per_streamed_token_c16",
    "torch_mesh_over_direct_tokens_per_s_c1", "torch_direct_over_inprocess_tokens_per_s_c1",
    "noisy_neighbor_p95_ttft_ratio", "quota_decision_us_p99",
    "quota_global_error_pct",
    "rollback_propagation_ms_max", "rollback_first_generation_from_command_ms_p50",
    "audit_durable_events_per_s", "audit_ack_p99_ms_c1",
    "grpc_tokens_per_s_c16",
    "version_cold_start_s", "cold_start_fetch_over_local", "rollback_first_token_ms",
    "fallback_routing_added_ttft_p50_ms", "scheduler_kill_failed_fraction",
    "failover_pause_ms_p50", "failover_pause_ms_p99", "failover_completed_fraction",
    "torch_inprocess_over_transformers_cb_tokens_per_s_c8", "torch_bf16_over_fp32_tokens_per_s_c8",
    "litellm_added_ttft_p50_ms_c1", "mesh_added_over_litellm_added_ttft_p50_c1",
    "tls_over_plaintext_tokens_per_s_c16", "tls_added_ttft_p50_ms_c1",
    "tracing_over_untraced_tokens_per_s_c16", "tracing_added_ttft_p50_ms_c1",
    "response_cache_hit_ttft_ms_p50", "structured_over_free_tokens_per_s_c8",
)
UNMEASURED = "unmeasured"  # {figure: why it is null}


def failed_requests(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The error counts that are not zero (figures named `…errors…`)."""
    return {name: value for name, value in figures.items() if "errors" in name and value}


def run_all(shape: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every benchmark, each with its keyword arguments from `shape` (none: its defaults)."""
    # Its own etcd, replicas and schedulers: run before the stack, which would share the CPUs.
    routing_figures = routing.run(**shape.get("routing", {}))
    routing_figures.update(midstream_failover.run(**shape.get("midstream_failover", {})))
    # In this process, on the model's cached copy: no stack needed, none to share the CPUs with.
    engine_figures = engine_limit.run(**shape.get("engine_limit", {}))
    engine_figures.update(structured_output.run(**shape.get("structured_output", {})))
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        state_dir = pathlib.Path(state)
        stack = Stack(StackOptions(state_dir=state_dir, demo_plan=BENCH_PLAN))
        info = stack.up()
        try:
            figures = compare(info, **shape["streaming"])
            figures.update(gateway_throughput.run(info, **shape.get("gateway_throughput", {})))
            figures.update(tls_cost.run(info, state_dir, BENCH_PLAN,
                                        **shape.get("tls_cost", {})))
            figures.update(tracing_cost.run(info, state_dir, **shape.get("tracing_cost", {})))
            figures.update(response_cache.run(info, **shape.get("response_cache", {})))
            figures.update(torch_engine.compare(info, state_dir / "data" / "blobs",
                                                **shape.get("torch_engine", {})))
            figures.update(asyncio.run(noisy_neighbor.run(info,
                                                          **shape.get("noisy_neighbor", {}))))
            figures.update(quota_accuracy.run(info, state_dir, **shape.get("quota_accuracy", {})))
            figures.update(rollback.run(info, state_dir, **shape.get("rollback", {})))
            figures.update(audit.run(info.endpoints["auditor"],
                                     audit.Writer(info.client_tls("gateway"), info.mesh_token),
                                     **shape.get("audit", {})))
            figures.update(openai_load.run(info, state_dir, **shape.get("openai_load", {})))
            figures.update(litellm_peer.run(info, figures.get("added_ttft_p50_ms_c1"),
                                            **shape.get("litellm_peer", {})))
            figures.update(failover.run(stack, **shape.get("failover", {})))
            # Last: it leaves its versions of the demo model registered and loaded.
            figures.update(versions.run(info, state_dir, **shape.get("versions", {})))
        finally:
            stack.down()
    figures.update(routing_figures)
    figures.update(engine_figures)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,16,64", help="Concurrent streams, comma-separated.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="Per level and path: no new requests after this.")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get(SMOKE_ENV) == "1",
                        help=f"Every benchmark once, tiny counts, no figure judged "
                             f"({SMOKE_ENV}=1).")
    args = parser.parse_args()
    figures = run_all(SMOKE if args.smoke else {"streaming": {
        "levels": tuple(int(x) for x in args.levels.split(",")), "max_tokens": args.max_tokens,
        "requests_per_stream": args.requests_per_stream, "budget_s": args.budget_s}})
    print(json.dumps(figures, sort_keys=True), flush=True)
    problems = []
    unmeasured = figures.get(UNMEASURED, {})
    if missing := [name for name in HEADLINE
                   if figures.get(name) is None and name not in unmeasured]:
        problems.append(f"headline figures missing from the last line (or null with no reason "
                        f"under {UNMEASURED!r}): {missing}")
    if args.smoke and (failed := failed_requests(figures)):
        problems.append(f"requests failed in the smoke run: {failed}")
    if problems:
        sys.exit("bench: " + "; ".join(problems))


if __name__ == "__main__":
    main()
