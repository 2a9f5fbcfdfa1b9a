"""What TLS costs: the same streamed generations through a mutual-TLS stack and through a
plaintext-development stack, both up at once, measured in alternating rounds.

The TLS stack is the one the other benchmarks use; this module starts a second stack
(`StackOptions(tls=False)`) beside it. Each level runs plaintext, TLS, TLS, plaintext (so a
drift in the machine's load during the level falls on both sides alike) through
`streaming.run_level`'s "mesh" path: client → gateway over TLS or not, then every hop behind
it (scheduler, ratelimit, Triton, auditor) the same way.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import statistics

from bench.pools import client_pool
from bench.streaming import CLIENT_PROCESSES, LevelResult, run_level, served_triton_model
from deploy.local.demo_models import REFERENCE_MODEL
from deploy.local.stack import Stack, StackInfo, StackOptions
from services.common.tenancy import TenantPlan

LEVELS = (1, 16)  # TTFT is read at c1, throughput at c16 (the headline figures)
ORDER = ("plaintext", "tls", "tls", "plaintext")


def alternating_rounds(pool: concurrent.futures.ProcessPoolExecutor,
                       stacks: dict[str, StackInfo], order: tuple[str, ...], concurrency: int,
                       requests: int, max_tokens: int, budget_s: float
                       ) -> dict[str, list[LevelResult]]:
    """One level through each stack in `order` (A, B, B, A: a drift in the machine's load falls
    on both alike); also what bench/tracing_cost.py compares with."""
    rounds: dict[str, list[LevelResult]] = {name: [] for name in stacks}
    for name in order:
        stack = stacks[name]
        rounds[name].append(run_level(pool, "mesh", stack,
                                      served_triton_model(stack, stack.reference_model),
                                      concurrency, requests, max_tokens, budget_s))
    return rounds


def compare(tls_stack: StackInfo, plaintext_stack: StackInfo, max_tokens: int = 64,
            requests_per_stream: int = 4, min_requests: int = 32, budget_s: float = 120.0,
            warmup_requests: int = 8) -> dict[str, float]:
    stacks = {"plaintext": plaintext_stack, "tls": tls_stack}
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
            print(f"tls {c:>4}: plaintext {tokens['plaintext']:8.1f} tok/s ttft p50 "
                  f"{ttft['plaintext']:7.1f} ms | tls {tokens['tls']:8.1f} tok/s ttft p50 "
                  f"{ttft['tls']:7.1f} ms | ratio {tokens['tls'] / tokens['plaintext']:.3f} "
                  f"({errors} err)", flush=True)
            figures.update({
                f"plaintext_tokens_per_s_{c}": round(tokens["plaintext"], 1),
                f"tls_tokens_per_s_{c}": round(tokens["tls"], 1),
                f"tls_over_plaintext_tokens_per_s_{c}":
                    round(tokens["tls"] / tokens["plaintext"], 3),
                f"plaintext_ttft_p50_ms_{c}": round(ttft["plaintext"], 2),
                f"tls_ttft_p50_ms_{c}": round(ttft["tls"], 2),
                f"tls_added_ttft_p50_ms_{c}": round(ttft["tls"] - ttft["plaintext"], 2),
                f"tls_errors_{c}": errors,
            })
    return figures


def run(tls_stack: StackInfo, state_dir: pathlib.Path, plan: TenantPlan,
        **shape: float) -> dict[str, float]:
    """Starts the plaintext stack in `state_dir/plaintext-stack` with the demo tenant on
    `plan` (the TLS stack's) and the reference model only (what is measured), compares, and
    stops it."""
    plaintext = Stack(StackOptions(state_dir=state_dir / "plaintext-stack", demo_plan=plan,
                                   tls=False, models=(REFERENCE_MODEL,)))
    info = plaintext.up()
    try:
        return compare(tls_stack, info, **shape)
    finally:
        plaintext.down()
