"""Show what arrives within a time budget, then stop: leaving the `async with` block cancels
the generation on the server (the engine stops, the unused quota is refunded).

    python examples/cancel_on_timeout.py --budget 0.5 "Write a long story about the sea."
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from infermesh_client import AsyncClient

MODEL = os.environ.get("INFERMESH_MODEL", "demo-chat")


async def run(prompt: str, budget: float) -> None:
    async with AsyncClient() as client:
        started = time.monotonic()
        async with client.stream(MODEL, prompt, max_tokens=512) as stream:
            async for delta in stream:
                print(delta.text, end="", flush=True)
                if time.monotonic() - started > budget:
                    break  # the `async with` sends Cancel for this generation
        if stream.result is None:
            print(f"\n[stopped after {budget:.1f}s; the server cancelled the rest]")
        else:
            print(f"\n[finished in time: {stream.result.finish_reason}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Write a long story about the sea.")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds")
    args = parser.parse_args()
    asyncio.run(run(args.prompt, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
