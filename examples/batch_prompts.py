"""Many prompts at once, at most N in flight, on one client (one connection, one stream).

Refusals for quota or overload (RESOURCE_EXHAUSTED with the server's retry delay) are retried by
the client after that delay, up to its RetryPolicy; each prompt is one logical call with its own
idempotency key, so a retried prompt is never run or charged twice.

    python examples/batch_prompts.py prompts.txt --concurrency 8     # one prompt per line
    python examples/batch_prompts.py                                  # a few built-in prompts
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from infermesh_client import AsyncClient, InfermeshError, RetryPolicy

MODEL = os.environ.get("INFERMESH_MODEL", "demo-chat")
PROMPTS = ["Name a colour.", "Name a fruit.", "Name a river.", "Name a planet.",
           "Name a tree.", "Name a city."]


async def run(prompts: list[str], concurrency: int, max_tokens: int) -> int:
    places = asyncio.Semaphore(concurrency)
    retry = RetryPolicy(max_attempts=6, max_wait=60.0)  # patient: a batch can wait for quota

    async with AsyncClient(retry=retry, timeout=120) as client:

        async def one(index: int, prompt: str) -> tuple[int, str]:
            async with places:
                try:
                    answer = await client.generate(MODEL, messages=[("user", prompt)],
                                                   max_tokens=max_tokens)
                    return index, answer.text.strip().replace("\n", " ")
                except InfermeshError as error:  # retries used up, or not retryable
                    return index, f"[{error.code}] {error.message}"

        started = time.monotonic()
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    failed = 0
    for index, text in sorted(results):
        failed += text.startswith("[")
        print(f"{index}\t{prompts[index]!r}\t{text}")
    print(f"{len(prompts)} prompts, {failed} failed, {time.monotonic() - started:.1f}s",
          file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="one prompt per line (default: a few built in)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    prompts = PROMPTS
    if args.file:
        with open(args.file) as file:
            prompts = [line.strip() for line in file if line.strip()]
    return asyncio.run(run(prompts, args.concurrency, args.max_tokens))


if __name__ == "__main__":
    sys.exit(main())
