"""What tracing costs: the same streamed generations through a stack that traces every one
(its receiver on, sampling 100 %) and through the benchmarks' stack, which traces nothing (no
endpoint: the no-op path), both up at once, measured in alternating rounds (tls_cost's).

The traced stack's every process exports its spans over OTLP to the stack's own receiver, which
writes them to disk (`StackOptions.traces_dir`): the whole cost a user of `--traces` pays,
receiver included, on the same two cores.
"""

from __future__ import annotations

import pathlib
import statistics

from bench.pools import client_pool
from bench.streaming import CLIENT_PROCESSES
from bench.tls_cost import LEVELS, alternating_rounds
from deploy.local.demo_models import REFERENCE_MODEL
from deploy.local.stack import Stack, StackInfo, StackOptions
from deploy.local.traces import read_spans
from services.common.tenancy import TenantPlan

ORDER = ("untraced", "traced", "traced", "untraced")


def compare(untraced_stack: StackInfo, traced_stack: StackInfo, max_tokens: int = 64,
            requests_per_stream: int = 4, min_requests: int = 32, budget_s: float = 120.0,
            warmup_requests: int = 8) -> dict[str, float]:
    stacks = {"untraced": untraced_stack, "traced": traced_stack}
    figures: dict[str, float] = {}
    with client_pool(CLIENT_PROCESSES) as pool:
        alternating_rounds(pool, stacks, ORDER, min(4, warmup_requests), warmup_requests, 4,
                           budget_s)
        for concurrency in LEVELS:
            requests = max(min_requests, concurrency * requests_per_stream)
            rounds = alternating_rounds(pool, stacks, ORDER, concurrency, requests, max_tokens,
                                        budget_s)
            tokens = {name: statistics.mean(r.tokens_per_s for r in results)
                      for name, results in rounds.items()}
            ttft = {name: statistics.mean(r.ttft_p50_ms for r in results)
                    for name, results in rounds.items()}
            errors = sum(r.errors for results in rounds.values() for r in results)
            c = f"c{concurrency}"
            print(f"tracing {c:>4}: untraced {tokens['untraced']:8.1f} tok/s ttft p50 "
                  f"{ttft['untraced']:7.1f} ms | traced {tokens['traced']:8.1f} tok/s ttft p50 "
                  f"{ttft['traced']:7.1f} ms | ratio "
                  f"{tokens['traced'] / tokens['untraced']:.3f} ({errors} err)", flush=True)
            figures.update({
                f"untraced_tokens_per_s_{c}": round(tokens["untraced"], 1),
                f"traced_tokens_per_s_{c}": round(tokens["traced"], 1),
                f"tracing_over_untraced_tokens_per_s_{c}":
                    round(tokens["traced"] / tokens["untraced"], 3),
                f"tracing_added_ttft_p50_ms_{c}": round(ttft["traced"] - ttft["untraced"], 2),
                f"tracing_errors_{c}": errors,
            })
    return figures


def run(untraced_stack: StackInfo, state_dir: pathlib.Path, plan: TenantPlan,
        **shape: float) -> dict[str, float]:
    """Starts the traced stack in `state_dir/traced-stack` with the demo tenant on `plan` and
    the reference model only (what is measured), compares, counts the spans it received, and
    stops it."""
    traces_dir = state_dir / "traced-stack" / "traces"
    traced = Stack(StackOptions(state_dir=state_dir / "traced-stack", demo_plan=plan,
                                models=(REFERENCE_MODEL,), traces_dir=traces_dir,
                                trace_sample_ratio=1.0))
    info = traced.up()
    try:
        figures = compare(untraced_stack, info, **shape)
    finally:
        traced.down()  # its processes export what they hold as they stop
    figures["tracing_spans_received"] = sum(1 for _ in read_spans(traces_dir))
    return figures
