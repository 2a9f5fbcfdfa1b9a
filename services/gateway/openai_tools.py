"""Tool calls in OpenAI's HTTP shapes: `message.tool_calls` of a whole answer, and the
`delta.tool_calls` pieces of a streamed one (the name first, then the arguments as they come).

A forced call (`required`, a named function) streams as calls from its first token. With `auto`
the answer is held while it can still be a call (it starts with `[` or `{`) and decided at its
end; any other answer streams as content at once.
"""

from __future__ import annotations

from typing import Any

from services.gateway.requests import GenerationRequest
from services.gateway.tool_calls import (
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    call_id,
    parse_calls,
)
from services.gateway.validation import forced_tool_call

__all__ = ["StreamedToolCalls", "message_tool_calls"]


def message_tool_calls(calls: tuple[ToolCall, ...], request_id: str) -> list[dict[str, Any]]:
    return [{"id": call_id(request_id, index), "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for index, call in enumerate(calls)]


class StreamedToolCalls:
    """Splits a streamed answer into content and `delta.tool_calls` pieces."""

    def __init__(self, request: GenerationRequest, id_prefix: str):
        """`id_prefix`: what names the calls (`tool_calls.call_id`): the request's id, and a
        choice's index past the first."""
        self._request = request
        self._id_prefix = id_prefix
        self._forced = forced_tool_call(request)
        self._stream = ToolCallStream() if self._forced else None
        self._holding = bool(request.tools) and request.tool_choice != "none" and not self._forced
        self._held = ""
        self.called = False  # some call went out

    def feed(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content to send, tool-call pieces to send) for the next piece of text."""
        if self._stream is not None:
            return None, self._pieces(self._stream.feed(text))
        if not self._holding:
            return text, []
        self._held += text
        start = self._held.lstrip()[:1]
        if start in ("", "[", "{"):
            return None, []
        self._holding, held, self._held = False, self._held, ""
        return held, []

    def finish(self) -> tuple[str | None, list[dict[str, Any]]]:
        """What is left when the answer ended: held content, or the calls it turned out to be."""
        if not self._holding or not self._held:
            return None, []
        calls = parse_calls(self._held, self._request.tools)
        if calls is None:
            return self._held, []
        pieces: list[ToolCallDelta] = []
        for index, call in enumerate(calls):
            pieces += [ToolCallDelta(index, name=call.name),
                       ToolCallDelta(index, arguments=call.arguments)]
        return None, self._pieces(pieces)

    def _pieces(self, deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
        pieces = []
        for delta in deltas:
            if delta.name is not None:
                self.called = True
                pieces.append({"index": delta.index,
                               "id": call_id(self._id_prefix, delta.index),
                               "type": "function",
                               "function": {"name": delta.name, "arguments": ""}})
            elif delta.arguments:
                pieces.append({"index": delta.index,
                               "function": {"arguments": delta.arguments}})
        return pieces
