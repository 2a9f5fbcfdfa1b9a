"""`make bench`: starts its own embedded stack, runs every benchmark, prints one JSON line last.

The last line holds every figure under stable names, so runs can be compared by machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import tempfile

from bench import (
    audit, noisy_neighbor, openai_load, quota_accuracy, rollback, routing, torch_engine,
)
from bench.streaming import compare
from deploy.local.stack import Stack, StackOptions
from services.common.tenancy import TenantPlan

# The benchmark tenant must not be what limits the measurement.
BENCH_PLAN = TenantPlan(requests_per_minute=1_000_000, input_tokens_per_minute=10**9,
                        output_tokens_per_minute=10**9, max_concurrency=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,16,64", help="Concurrent streams, comma-separated.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="Per level and path: no new requests after this.")
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    # Its own etcd, replicas and schedulers: run before the stack, which would share the CPUs.
    routing_figures = routing.run()
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        stack = Stack(StackOptions(state_dir=pathlib.Path(state), demo_plan=BENCH_PLAN))
        info = stack.up()
        try:
            figures = compare(
                info, levels, args.max_tokens, args.requests_per_stream, args.budget_s
            )
            figures.update(torch_engine.compare(info, pathlib.Path(state) / "data" / "blobs"))
            figures.update(asyncio.run(noisy_neighbor.run(info)))
            figures.update(quota_accuracy.run(info, pathlib.Path(state)))
            figures.update(rollback.run(info, pathlib.Path(state)))
            figures.update(audit.run(info.endpoints["auditor"]))
            figures.update(openai_load.run(info, pathlib.Path(state)))
        finally:
            stack.down()
    figures.update(routing_figures)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
