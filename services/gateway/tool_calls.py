"""Tool calling in the gateway's own terms (no HTTP, no protobuf): how tools reach the model, how
a forced call is constrained, and how the model's text becomes tool calls.

SmolLM2's chat template has no tool support, so the tools go in a system block of our own (the
Hermes/Qwen convention, in JSON): the model answers a call with a JSON array
`[{"name": ..., "arguments": {...}}]`. With `tool_choice` `required` or a named function that
array is a structured output (`json_schema`), so the engine's constrained decoding makes the
arguments valid against the function's schema; with `auto` the text is parsed and becomes calls
only when it is such an array naming known tools. Earlier calls in the conversation are shown to
the model in the same form, and `tool` messages as turns of the role `tool`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["TOOL_CHOICES", "Tool", "ToolCall", "ToolCallDelta", "ToolCallStream", "answer_calls",
           "call_id", "calls_text", "forced_schema", "parse_calls", "tools_block"]

TOOL_CHOICES = ("none", "auto", "required", "function")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = "{}"  # the JSON schema of its arguments, as compact JSON text


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text


def call_id(request_id: str, index: int) -> str:
    """A call's id: unique within the request (whose id is unique for its client)."""
    return f"call_{request_id}_{index}"


def tools_block(tools: tuple[Tool, ...]) -> str:
    """The system text that tells the model which functions it may call, and how."""
    lines = ["You can call functions. To call one or more, answer with only a JSON array: "
             '[{"name": "<function name>", "arguments": {<arguments>}}]. Functions:']
    for tool in tools:
        entry: dict[str, Any] = {"name": tool.name, "parameters": json.loads(tool.parameters)}
        if tool.description:
            entry["description"] = tool.description
        lines.append(json.dumps(entry, separators=(",", ":")))
    return "\n".join(lines)


def calls_text(calls: tuple[ToolCall, ...]) -> str:
    """Earlier calls as the model writes them (the arguments as the client sent them back)."""
    return "[" + ",".join(f'{{"name":{json.dumps(c.name)},"arguments":{c.arguments or "{}"}}}'
                          for c in calls) + "]"


def answer_calls(tools: tuple[Tool, ...], tool_choice: str, text: str
                 ) -> tuple[ToolCall, ...] | None:
    """The calls a finished answer makes, or None when it is content (no tools, `none`, or
    text that is not a call of known tools)."""
    if not tools or tool_choice == "none":
        return None
    return parse_calls(text, tools)


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": tool.name},
                           "arguments": json.loads(tool.parameters)}}


def forced_schema(tools: tuple[Tool, ...], name: str, parallel: bool) -> str:
    """The JSON schema a forced answer follows: an array of calls of the named function (or of
    any tool when `name` is empty), one call unless `parallel`."""
    chosen = [tool for tool in tools if not name or tool.name == name]
    item = (_call_schema(chosen[0]) if len(chosen) == 1
            else {"anyOf": [_call_schema(tool) for tool in chosen]})
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return json.dumps(schema, separators=(",", ":"))


def parse_calls(text: str, tools: tuple[Tool, ...]) -> tuple[ToolCall, ...] | None:
    """The calls in a finished answer, or None when it is not a call of known tools."""
    try:  # the model's own text: NaN and Infinity are not JSON a client could parse back
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict):
        value = [value]
    names = {tool.name for tool in tools}
    if not isinstance(value, list) or not value:
        return None
    calls = []
    for entry in value:
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str)
                or entry["name"] not in names
                or not isinstance(entry.get("arguments", {}), dict)):
            return None
        calls.append(ToolCall(entry["name"], json.dumps(entry.get("arguments", {}),
                                                        separators=(",", ":"))))
    return tuple(calls)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call: its name once known (first piece), then argument text."""

    index: int
    name: str | None = None
    arguments: str = ""


class ToolCallStream:
    """Turns a forced answer's text, as it streams, into call pieces: the name as soon as it is
    complete, then the arguments' text as it comes. The text is compact JSON of the form
    `[{"name":"f","arguments":{...}},...]` (the grammar fixes the form and the key order)."""

    _NAME_OPEN = '{"name":"'
    _ARGUMENTS_OPEN = '","arguments":'

    def __init__(self) -> None:
        self._index = -1
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._call = ""  # the current call's text so far (before its arguments are found)
        self._in_arguments = False

    def feed(self, text: str) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        arguments = ""
        for char in text:
            closes_call = self._step(char)
            if self._in_arguments:
                if closes_call:
                    self._in_arguments = False
                    continue
                arguments += char
                continue
            if closes_call:  # a call without arguments: nothing to stream
                self._call = ""
            elif self._depth >= 2:
                self._call += char
                if self._call.startswith(self._NAME_OPEN) and self._call.endswith(
                        self._ARGUMENTS_OPEN):
                    quoted = self._call[len('{"name":'):-len(',"arguments":')]
                    try:
                        name = json.loads(quoted)
                    except ValueError:  # not from a grammar: shown as written
                        name = quoted.strip('"')
                    self._index += 1
                    deltas.append(ToolCallDelta(self._index, name=name))
                    self._call, self._in_arguments = "", True
        if arguments:
            deltas.append(ToolCallDelta(self._index, arguments=arguments))
        return _merged(deltas)

    def _step(self, char: str) -> bool:
        """Tracks strings and nesting; True when `char` closes a call object."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
            return False
        if char == '"':
            self._in_string = True
        elif char in "[{":
            self._depth += 1
        elif char in "]}":
            self._depth -= 1
            return char == "}" and self._depth == 1
        return False


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive argument pieces of one call as one."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        if (merged and delta.name is None and merged[-1].index == delta.index
                and merged[-1].name is None):
            merged[-1] = ToolCallDelta(delta.index, arguments=merged[-1].arguments
                                       + delta.arguments)
        else:
            merged.append(delta)
    return merged
