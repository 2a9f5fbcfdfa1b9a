"""What tracing costs: the same streamed generations through a gateway that traces every one
(sampling 100 %, exporting to the stack's trace receiver) and through the benchmarks' gateway,
which traces nothing (no endpoint: the no-op path), both in front of the same schedulers and
Triton, measured in alternating rounds (tls_cost's).

The traced gateway is a second gateway process beside the benchmarks' stack (started in a few
seconds, where a second stack takes tens): the figure is the gateway's cost, which makes all
but one of a generation's spans; the scheduler's one span per route is not in it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time

from bench.pools import client_pool
from bench.streaming import CLIENT_PROCESSES
from bench.tls_cost import LEVELS, alternating_rounds
from deploy.local.gateways import ExtraGateway
from deploy.local.stack import StackInfo, start_trace_receiver
from deploy.local.traces import read_spans

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


def run(stack: StackInfo, state_dir: pathlib.Path, **shape: float) -> dict[str, float]:
    """Starts the receiver and the traced gateway beside `stack`, compares, stops them (the
    gateway first: it exports what it holds as it stops) and counts the spans received."""
    traces_dir = state_dir / "tracing-cost"
    receiver, tracing = start_trace_receiver(traces_dir, state_dir / "logs" / "traces.log",
                                             1.0, time.monotonic() + 30.0)
    try:
        gateway = ExtraGateway(stack, state_dir, name="gateway-traced", settings=tracing)
        gateway.start()
        try:
            traced = dataclasses.replace(
                stack, gateway=gateway.endpoint,
                endpoints={**stack.endpoints, "gateway": gateway.endpoint},
                pids={**stack.pids, "gateway": gateway.process.pid})
            figures = compare(stack, traced, **shape)
        finally:
            gateway.stop()
    finally:
        receiver.stop(grace_s=5.0)
    figures["tracing_spans_received"] = sum(1 for _ in read_spans(traces_dir))
    return figures
