"""An internal service calling the mesh inside its own deadline.

A request handler that has `budget` seconds left hands what remains to the generation (sent as
the request's timeout and the gRPC deadline), keeps one long-lived client for every request,
and turns the typed errors into its own answers: a refusal it may retry later, a deadline it
cannot meet, bad input it should not retry.

    python examples/internal_service_call.py --budget 2.0 "Summarise: the cat sat on the mat."
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from infermesh_client import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    RateLimited,
    RetryPolicy,
    Unavailable,
)

MODEL = os.environ.get("INFERMESH_MODEL", "demo-chat")
# One client per process: one connection, reused by every request the service handles.
CLIENT = Client(retry=RetryPolicy(max_attempts=3, max_wait=5.0))


def summarise(text: str, deadline: float) -> tuple[int, str]:
    """An HTTP-like handler: (status, body), never past `deadline` (time.monotonic())."""
    remaining = deadline - time.monotonic()
    try:
        answer = CLIENT.generate(MODEL, messages=[("user", text)], max_tokens=48,
                                 timeout=remaining, user="internal-summariser")
    except DeadlineExceeded:
        return 504, "the model did not answer within the caller's deadline"
    except RateLimited as error:
        return 429, f"over quota ({error.reason or 'rate'}); retry after {error.retry_after}s"
    except Unavailable as error:
        return 503, f"no replica: {error.message}"
    except InvalidArgument as error:
        return 400, f"bad {error.field}: {error.message}"
    return 200, answer.text.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default="Summarise: the cat sat on the mat.")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds the caller gave us")
    args = parser.parse_args()
    try:
        status, body = summarise(args.text, time.monotonic() + args.budget)
    finally:
        CLIENT.close()
    print(status, body)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
