"""The cost of structured output in the torch engine: the same batch with and without a JSON
schema constraining every request, in this process (the constraint's cost is the engine's).

Both sides load the demo model's cached copy with the demo manifest's KV cache and keep
`concurrency` requests in flight until `requests` have finished, each streaming exactly
`max_tokens` tokens of the same prompt, seeded, at the same temperature: free text with EOS
banned, or a schema whose one string must be longer than `max_tokens` tokens can write (so the
grammar never lets it end) — every guided token pays for its mask and its grammar step. The two
sides alternate for `rounds` rounds; the figure is the median of the rounds' ratios.

    python -m bench.structured_output [--concurrency 8] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from backends.triton.torch_engine import Generation, Sampling, TorchEngine, TorchEngineConfig
from backends.triton.weights import cache_root, default_model_dir
from bench.engine_limit import KV_CACHE
from bench.streaming import LevelResult
from bench.torch_engine import PROMPT, TEMPERATURE, drive_engine

# One long string: nothing the schema allows ends within a benchmark's token budget.
SCHEMA = json.dumps({"type": "object", "additionalProperties": False, "required": ["story"],
                     "properties": {"story": {"type": "string", "minLength": 100_000}}})


def drive_guided(engine: TorchEngine, concurrency: int, requests: int,
                 max_tokens: int) -> LevelResult:
    """As `bench.torch_engine.drive_engine`, every request constrained by `SCHEMA`."""
    def guided(request_id: str, number: int, max_tokens: int) -> Generation:
        return Generation(request_id, PROMPT, max_tokens,
                          Sampling(temperature=TEMPERATURE, seed=number),
                          guide=engine.compile_guide("json_schema", SCHEMA))

    return drive_engine(engine, concurrency, requests, max_tokens, guided, "torch guided")


def run(concurrency: int = 8, max_tokens: int = 64, requests_per_stream: int = 2,
        rounds: int = 3, warmup_tokens: int = 8) -> dict[str, float]:
    """`structured_over_free_tokens_per_s_c<N>` (the issue's goal: at least 0.8), and each
    side's tokens/s and errors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = default_model_dir(cache_root())
    engine = TorchEngine(model_dir, model_dir, TorchEngineConfig(**KV_CACHE, dtype="auto"))
    engine.start()
    sides = {"free": drive_engine, "structured": drive_guided}
    results: dict[str, list[LevelResult]] = {side: [] for side in sides}
    try:
        for drive in sides.values():  # warm (and compile the schema once)
            drive(engine, 2, 2, warmup_tokens)
        for round_index in range(rounds):
            for side, drive in sides.items():
                result = drive(engine, concurrency, concurrency * requests_per_stream,
                               max_tokens)
                results[side].append(result)
                print(f"structured output c{concurrency} round {round_index}: {side:>10} "
                      f"{result.tokens_per_s:7.1f} tok/s", flush=True)
    finally:
        engine.stop()
    figures: dict[str, float] = {
        f"structured_over_free_tokens_per_s_c{concurrency}": round(statistics.median(
            g.tokens_per_s / f.tokens_per_s
            for g, f in zip(results["structured"], results["free"], strict=True)), 3)}
    for side, level in results.items():
        figures[f"torch_{side}_tokens_per_s_c{concurrency}"] = round(
            statistics.median(r.tokens_per_s for r in level), 1)
        figures[f"structured_output_errors_{side}_c{concurrency}"] = sum(r.errors for r in level)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.concurrency, args.max_tokens, rounds=args.rounds), sort_keys=True),
          flush=True)


if __name__ == "__main__":
    main()
