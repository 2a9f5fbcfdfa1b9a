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


def alternating_rounds(pool: concurrent.futures.ProcessPoolExecutor,
                       stacks: dict[str, StackInfo], order: tuple[str, ...], concurrency: int,
                       requests: int, max_tokens: int, budget_s: float
                       ) -> dict[str, list[LevelResult]]:
    """One level through each stack in `order` (A, B, B, A: a drift in the machine's load falls
    on both alike)."""
    rounds: dict[str, list[LevelResult]] = {name: [] for name in stacks}
    for name in order:
        stack = stacks[name]
        rounds[name].append(run_level(pool, "mesh", stack,
                                      served_triton_model(stack, stack.reference_model),
                                      concurrency, requests, max_tokens, budget_s))
    return rounds


def compare_alternating(label: str, baseline: tuple[str, StackInfo],
                        candidate: tuple[str, StackInfo], max_tokens: int = 64,
                        requests_per_stream: int = 4, min_requests: int = 32,
                        budget_s: float = 120.0, warmup_requests: int = 8) -> dict[str, float]:
    """Compares two stacks, each named, at every level of `LEVELS` in alternating rounds
    (baseline, candidate, candidate, baseline) after a short warm-up; figures are named after
    the stacks (`{name}_tokens_per_s_c16`) and the `label` (`{label}_over_{baseline}_...`,
    `{label}_added_ttft_p50_ms_c1`, `{label}_errors_c1`). Also bench/tracing_cost.py's."""
    base, cand = baseline[0], candidate[0]
    stacks = dict((baseline, candidate))
    order = (base, cand, cand, base)
    figures: dict[str, float] = {}
    with client_pool(CLIENT_PROCESSES) as pool:
        alternating_rounds(pool, stacks, order, min(4, warmup_requests), warmup_requests, 4,
                           budget_s)
        for concurrency in LEVELS:
            requests = max(min_requests, concurrency * requests_per_stream)
            rounds = alternating_rounds(pool, stacks, order, concurrency, requests, max_tokens,
                                        budget_s)
            tokens = {name: statistics.mean(r.tokens_per_s for r in results)
                      for name, results in rounds.items()}
            ttft = {name: statistics.mean(r.ttft_p50_ms for r in results)
                    for name, results in rounds.items()}
            errors = sum(r.errors for results in rounds.values() for r in results)
            c = f"c{concurrency}"
            print(f"{label} {c:>4}: {base} {tokens[base]:8.1f} tok/s ttft p50 "
                  f"{ttft[base]:7.1f} ms | {cand} {tokens[cand]:8.1f} tok/s ttft p50 "
                  f"{ttft[cand]:7.1f} ms | ratio {tokens[cand] / tokens[base]:.3f} "
                  f"({errors} err)", flush=True)
            figures.update({
                f"{base}_tokens_per_s_{c}": round(tokens[base], 1),
                f"{cand}_tokens_per_s_{c}": round(tokens[cand], 1),
                f"{label}_over_{base}_tokens_per_s_{c}": round(tokens[cand] / tokens[base], 3),
                f"{base}_ttft_p50_ms_{c}": round(ttft[base], 2),
                f"{cand}_ttft_p50_ms_{c}": round(ttft[cand], 2),
                f"{label}_added_ttft_p50_ms_{c}": round(ttft[cand] - ttft[base], 2),
                f"{label}_errors_{c}": errors,
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
        return compare_alternating("tls", ("plaintext", info), ("tls", tls_stack), **shape)
    finally:
        plaintext.down()
