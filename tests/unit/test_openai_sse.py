"""The SSE encoding of pipeline events: token batches, idle heartbeats, the last chunk, usage,
[DONE], and an in-stream error after the first token."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from services.common import errors
from services.gateway.openai_http import DONE, HEARTBEAT, _sse_chunks
from services.gateway.openai_protocol import ChatCompletionBody, parse_body
from services.gateway.pipeline import Accepted, ChoiceEnd, Finished, TokenText


def body(**fields) -> ChatCompletionBody:
    return parse_body(ChatCompletionBody, {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields})


async def collect(events, request_body, feed_later=()) -> list[bytes]:
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    run = SimpleNamespace(events=queue)
    out = []
    chunks = _sse_chunks(run, Accepted("r", "sha256:v"), request_body, "chat", "r", 0.05)
    async with asyncio.timeout(5):
        async for chunk in chunks:
            out.append(chunk)
            if chunk == HEARTBEAT and feed_later:
                for event in feed_later:
                    queue.put_nowait(event)
                feed_later = ()
    return out


def payloads(chunks: list[bytes]) -> list[dict]:
    return [json.loads(c[len(b"data: "):]) for c in chunks if c.startswith(b"data: {")]


async def test_waiting_tokens_are_one_chunk_then_finish_usage_and_done():
    finished = Finished("r", "length", "sha256:v", prompt_tokens=3, completion_tokens=2)
    chunks = await collect([TokenText("r", "a"), TokenText("r", "b"), finished],
                           body(stream_options={"include_usage": True}))
    assert chunks[-1] == DONE
    first, last, usage = payloads(chunks)
    assert first["choices"][0]["delta"] == {"content": "ab", "role": "assistant"}
    assert first["system_fingerprint"] == "sha256:v"
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5


async def test_idle_stream_gets_a_heartbeat_comment():
    chunks = await collect([], body(), feed_later=[TokenText("r", "x"), Finished("r", "stop")])
    assert chunks[0] == HEARTBEAT
    assert payloads(chunks)[0]["choices"][0]["delta"]["content"] == "x"
    assert chunks[-1] == DONE


async def test_failure_after_first_token_is_an_error_event_without_done():
    failed = Finished("r", "error", error=errors.Unavailable("replica lost"))
    chunks = await collect([TokenText("r", "x"), failed], body())
    assert DONE not in chunks
    assert payloads(chunks)[-1]["error"]["type"] == "service_unavailable"


async def test_several_choices_stream_by_index_each_with_its_own_end():
    finished = Finished("r", "stop", "sha256:v", prompt_tokens=3, completion_tokens=3,
                        choices=(ChoiceEnd(0, "stop", 1), ChoiceEnd(1, "length", 2)))
    chunks = await collect([TokenText("r", "a", index=1), TokenText("r", "b", index=1),
                            TokenText("r", "x"), TokenText("r", "c", index=1), finished],
                           body(n=2))
    seen = [(p["choices"][0]["index"], p["choices"][0]["delta"], p["choices"][0]["finish_reason"])
            for p in payloads(chunks)]
    assert seen == [(1, {"content": "ab", "role": "assistant"}, None),
                    (0, {"content": "x", "role": "assistant"}, None),
                    (1, {"content": "c"}, None), (0, {}, "stop"), (1, {}, "length")]
    assert chunks[-1] == DONE


async def test_a_generation_that_moved_replicas_says_so_in_its_last_chunk_only():
    finished = Finished("r", "length", "sha256:v", prompt_tokens=3, completion_tokens=2,
                        moves=1, continuation_exact=True)
    first, last = payloads(await collect([TokenText("r", "a"), finished], body()))
    assert "infermesh_failover" not in first
    assert last["infermesh_failover"] == {"moves": 1, "continuation_exact": True}
    assert last["choices"][0]["finish_reason"] == "length"
    unmoved = payloads(await collect([TokenText("r", "a"), Finished("r", "stop")], body()))
    assert not any("infermesh_failover" in p for p in unmoved)
