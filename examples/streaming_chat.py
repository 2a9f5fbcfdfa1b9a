"""A chat in the terminal, streamed: each line you type is a user turn, the answer prints as it
is generated, and the conversation is sent back each time.

    source .infermesh/env && python examples/streaming_chat.py
    python examples/streaming_chat.py "What is the capital of France?"   # one turn, then exit

Ctrl-C while an answer streams stops it on the server (the `with` block cancels it).
"""

from __future__ import annotations

import os
import sys

from infermesh_client import Client, InfermeshError, Message

MODEL = os.environ.get("INFERMESH_MODEL", "demo-chat")


def main() -> int:
    turns = sys.argv[1:] or None
    history: list[Message] = [Message("system", "You are a helpful, concise assistant.")]
    with Client() as client:
        for line in turns or iter(lambda: input("> "), None):
            history.append(Message("user", line))
            try:
                with client.stream(MODEL, messages=history, max_tokens=128, timeout=60) as stream:
                    for delta in stream:
                        print(delta.text, end="", flush=True)
            except KeyboardInterrupt:
                print("\n[stopped]")
                history.pop()
                continue
            except InfermeshError as error:
                print(f"\n[{error.code}] {error.message}", file=sys.stderr)
                return 1
            answer = stream.result
            assert answer is not None
            print(f"\n[{answer.finish_reason}, {answer.usage.completion_tokens} tokens]")
            history.append(Message("assistant", answer.text))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EOFError:
        sys.exit(0)
