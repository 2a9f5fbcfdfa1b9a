"""The torch engine against its own limit: transformers' continuous batching, same process.

Both sides load the demo model (its converted copy in this machine's cache) in the same dtype,
with the demo manifest's KV cache (blocks, tokens per block, tokens per step) and the same batch:
`concurrency` requests in flight until `requests` have finished, each streaming exactly
`max_tokens` tokens of the same prompt at temperature 0.8. The engine does what it serves with
(per-request seeded sampling, stop handling, incremental detokenization); transformers'
manager only samples and returns token ids, which is the most the engine could reach.

The dtype is what the engine picks under "auto" (bfloat16 on a CPU that has it natively, else
float32). A third side, the engine in the other of the two dtypes, gives the bfloat16/float32
ratio. The sides run interleaved (engine, transformers, engine in the other dtype; again) for
`rounds` rounds, and each ratio is the median of the rounds' ratios, so a machine whose load
drifts biases none of them.

    python -m bench.engine_limit [--levels 1,8] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from backends.triton.torch_engine import (
    AUTO_DTYPE,
    DTYPES,
    TorchEngine,
    TorchEngineConfig,
    native_bfloat16,
)
from backends.triton.weights import cache_root, default_model_dir
from bench.streaming import LevelResult, Sample
from bench.torch_engine import PROMPT, TEMPERATURE, drive_engine, level_result

# The demo manifest's KV cache (deploy/local/demo_models.py: torch_manifest).
KV_CACHE = {"num_blocks": 128, "page_size": 32, "max_batch_tokens": 256}


class TransformersBaseline:
    """transformers' own continuous-batching manager over the same model, sampling at
    `TEMPERATURE` with EOS disabled, so every request runs to `max_new_tokens`."""

    def __init__(self, dtype: str):
        model_dir = default_model_dir(cache_root())
        self._prompt_ids = list(AutoTokenizer.from_pretrained(str(model_dir))(PROMPT)["input_ids"])
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype])
        self._manager = model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=True, temperature=TEMPERATURE,
                                               eos_token_id=-1),
            continuous_batching_config=ContinuousBatchingConfig(**KV_CACHE),
        )
        self._manager.start()
        self._submitted = 0  # request ids stay unique over the manager's life

    def stop(self) -> None:
        self._manager.stop(block=True, timeout=60)

    def drive(self, concurrency: int, requests: int, max_tokens: int) -> LevelResult:
        """As `bench.torch_engine.drive_engine`: `concurrency` in flight, `requests` in all."""
        started: dict[str, float] = {}
        first: dict[str, float] = {}
        samples: list[Sample] = []
        begin = time.perf_counter()
        while len(samples) < requests:
            while len(started) < requests and len(started) - len(samples) < concurrency:
                request_id = f"baseline-{self._submitted}"
                self._submitted += 1
                started[request_id] = time.perf_counter()
                self._manager.add_request(self._prompt_ids, request_id=request_id,
                                          max_new_tokens=max_tokens, streaming=True)
            output = self._manager.get_result(timeout=0.05)
            while output is not None:
                if output.generated_tokens and output.request_id not in first:
                    first[output.request_id] = time.perf_counter()
                if output.is_finished():
                    ttft = first.get(output.request_id, time.perf_counter())
                    samples.append(Sample(ttft - started[output.request_id],
                                          len(output.generated_tokens), output.error is None,
                                          output.error or ""))
                output = self._manager.get_result(timeout=0)
        return level_result("transformers", concurrency, samples, time.perf_counter() - begin)


def _median_ratio(numerators: list[LevelResult], denominators: list[LevelResult]) -> float:
    """The median over rounds of one side's tokens/s over the other's in the same round."""
    return round(statistics.median(
        a.tokens_per_s / b.tokens_per_s for a, b in zip(numerators, denominators, strict=True)), 3)


def _engine(dtype: str) -> TorchEngine:
    model_dir = default_model_dir(cache_root())
    engine = TorchEngine(model_dir, model_dir, TorchEngineConfig(**KV_CACHE, dtype=dtype))
    engine.start()
    return engine


def run(levels: tuple[int, ...] = (1, 8), max_tokens: int = 64, requests_per_stream: int = 2,
        rounds: int = 3, warmup_tokens: int = 8) -> dict[str, float | str]:
    """Figures `torch_engine_limit_…` per side and level, and the two ratios the issue names:
    `torch_inprocess_over_transformers_cb_tokens_per_s_c<N>` and
    `torch_bf16_over_fp32_tokens_per_s_c<N>`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = TorchEngineConfig(**KV_CACHE, dtype=AUTO_DTYPE).resolved_dtype
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    engine, baseline, engine_other = _engine(dtype), TransformersBaseline(dtype), _engine(other)
    sides: dict[str, Callable[[int, int, int], LevelResult]] = {
        "engine": lambda c, n, t: drive_engine(engine, c, n, t),
        "transformers": baseline.drive,
        "engine_other": lambda c, n, t: drive_engine(engine_other, c, n, t),
    }
    results: dict[tuple[str, int], list[LevelResult]] = {}
    try:
        for drive in sides.values():  # warm
            drive(2, 2, warmup_tokens)
        for concurrency in levels:
            requests = concurrency * requests_per_stream
            for round_index in range(rounds):
                for side, drive in sides.items():
                    result = drive(concurrency, requests, max_tokens)
                    results.setdefault((side, concurrency), []).append(result)
                    print(f"engine limit c{concurrency} round {round_index}: {side:>12} "
                          f"{result.tokens_per_s:7.1f} tok/s, ttft p50 "
                          f"{result.ttft_p50_ms:7.1f} ms", flush=True)
    finally:
        engine.stop()
        engine_other.stop()
        baseline.stop()
    figures: dict[str, float | str] = {
        "torch_engine_limit_dtype": dtype,
        "torch_native_bfloat16": int(native_bfloat16()),
    }
    names = {"engine": f"engine_{dtype}", "transformers": f"transformers_cb_{dtype}",
             "engine_other": f"engine_{other}"}
    for (side, concurrency), level in sorted(results.items()):
        tokens_per_s = statistics.median(r.tokens_per_s for r in level)
        figures[f"torch_limit_{names[side]}_tokens_per_s_c{concurrency}"] = round(tokens_per_s, 1)
        figures[f"torch_limit_errors_{side}_c{concurrency}"] = sum(r.errors for r in level)
    for concurrency in levels:
        ours, cb, alt = (results[s, concurrency] for s in sides)
        bf16, fp32 = (ours, alt) if dtype == "bfloat16" else (alt, ours)
        figures[f"torch_inprocess_over_transformers_cb_tokens_per_s_c{concurrency}"] = \
            _median_ratio(ours, cb)
        figures[f"torch_bf16_over_fp32_tokens_per_s_c{concurrency}"] = _median_ratio(bf16, fp32)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,8", help="Concurrent streams, comma-separated.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures = run(levels=tuple(int(x) for x in args.levels.split(",")),
                  max_tokens=args.max_tokens, rounds=args.rounds)
    print(json.dumps(figures, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
