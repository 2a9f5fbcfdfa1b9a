"""The embedded stack's trace receiver, and the reader behind `meshctl trace`.

`python -m deploy.local.traces --port P --dir DIR` serves OTLP's TraceService over gRPC on the
loopback address (plaintext: docs/decisions.md, "Traces in the embedded stack") and appends
every export to `DIR/traces.jsonl` as one line of OTLP JSON — the OpenTelemetry file exporter's
format: a `TracesData` per line, ids in hex. It is written with the `opentelemetry-proto` stubs
that come with the SDK's exporter, so reading traces needs no other install.

`generation_trace(DIR, request_id)` finds the trace whose root span carries that request id
(`infermesh.request_id`) and returns its spans as a tree with timings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import pathlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.common.net import LOOPBACK

TRACES_FILE = "traces.jsonl"
MAX_EXPORT_BYTES = 16 * 1024 * 1024  # one export request; the SDK sends batches of 512 spans
MAX_FILE_BYTES = 512 * 1024 * 1024  # past this, exports are refused (the stack is for testing)
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def otlp_json(request: trace_service_pb2.ExportTraceServiceRequest) -> str:
    """One line of the OTLP file format: protobuf's JSON mapping, with ids in hex (OTLP/JSON)."""
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in data.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _hex_ids(span)
                for link in span.get("links", ()):
                    _hex_ids(link)
    return json.dumps(data, separators=(",", ":"))


def _hex_ids(item: dict[str, Any]) -> None:
    for key in _ID_FIELDS:
        if item.get(key):
            item[key] = base64.b64decode(item[key]).hex()


class TraceFileWriter(trace_service_pb2_grpc.TraceServiceServicer):
    """Appends each export to the file; a full file refuses with RESOURCE_EXHAUSTED (the
    exporters count the spans as dropped)."""

    def __init__(self, path: pathlib.Path):
        self._path = path
        self._lock = asyncio.Lock()

    async def Export(self, request, context):
        line = otlp_json(request) + "\n"
        async with self._lock:
            written = await asyncio.to_thread(_append, self._path, line)
        if not written:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._path} is over {MAX_FILE_BYTES} bytes")
        return trace_service_pb2.ExportTraceServiceResponse()


def _append(path: pathlib.Path, line: str) -> bool:
    """Appends the line unless the file would grow past MAX_FILE_BYTES."""
    with path.open("a", encoding="utf-8") as out:
        if out.tell() + len(line) > MAX_FILE_BYTES:
            return False
        out.write(line)
    return True


async def serve(port: int, directory: pathlib.Path) -> None:
    """Receives until SIGTERM or SIGINT; loopback only."""
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", MAX_EXPORT_BYTES),
                                      ("grpc.so_reuseport", 0)))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        TraceFileWriter(directory / TRACES_FILE), server)
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"event": "receiving", "endpoint": f"{LOOPBACK}:{port}",
                      "file": str(directory / TRACES_FILE)}), flush=True)
    await stop.wait()
    await server.stop(2.0)  # the services flush their last spans as they stop before this


# -- reading ---------------------------------------------------------------------------------


@dataclass
class SpanNode:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    kind: int
    status: str  # "" (unset), "OK" or "ERROR: description"
    attributes: dict[str, Any]
    events: list[dict[str, Any]]
    children: list[SpanNode] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def as_dict(self, trace_start_ns: int) -> dict[str, Any]:
        return {
            "name": self.name, "service": self.service, "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "start_offset_ms": round((self.start_ns - trace_start_ns) / 1e6, 3),
            "duration_ms": round(self.duration_ms, 3), "status": self.status,
            "attributes": self.attributes,
            "events": [{"name": e["name"],
                        "offset_ms": round((e["time_ns"] - trace_start_ns) / 1e6, 3),
                        "attributes": e["attributes"]} for e in self.events],
            "children": [child.as_dict(trace_start_ns) for child in self.children],
        }


def _value(any_value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "arrayValue" in any_value:
        return [_value(v) for v in any_value["arrayValue"].get("values", ())]
    return None


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def read_spans(directory: pathlib.Path) -> Iterator[SpanNode]:
    """Every span in `directory`'s trace file, in the order received."""
    path = directory / TRACES_FILE
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            for resource_spans in json.loads(line).get("resourceSpans", ()):
                resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
                for scope_spans in resource_spans.get("scopeSpans", ()):
                    for span in scope_spans.get("spans", ()):
                        yield _node(span, str(resource.get("service.name", "")))


def _node(span: dict[str, Any], service: str) -> SpanNode:
    status = span.get("status", {})
    code = {1: "OK", 2: "ERROR"}.get(int(status.get("code", 0)), "")
    if code == "ERROR" and status.get("message"):
        code = f"ERROR: {status['message']}"
    return SpanNode(
        name=span.get("name", ""), service=service, trace_id=span.get("traceId", ""),
        span_id=span.get("spanId", ""), parent_span_id=span.get("parentSpanId", ""),
        start_ns=int(span.get("startTimeUnixNano", 0)), end_ns=int(span.get("endTimeUnixNano", 0)),
        kind=int(span.get("kind", 0)), status=code,
        attributes=_attributes(span.get("attributes", [])),
        events=[{"name": e.get("name", ""), "time_ns": int(e.get("timeUnixNano", 0)),
                 "attributes": _attributes(e.get("attributes", []))}
                for e in span.get("events", ())],
    )


@dataclass
class GenerationTrace:
    trace_id: str
    roots: list[SpanNode]  # the generation's span, and any span whose parent was not received
    spans: int

    @property
    def start_ns(self) -> int:
        return min(root.start_ns for root in self.roots)

    def as_dict(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "spans": self.spans,
                "roots": [root.as_dict(self.start_ns) for root in self.roots]}


def generation_trace(directory: pathlib.Path, request_id: str) -> GenerationTrace | None:
    """The trace of the generation with that request id (the last one, if the id was reused);
    None when no span carries it."""
    spans = list(read_spans(directory))
    trace_id = ""
    for span in spans:
        if span.attributes.get("infermesh.request_id") == request_id:
            trace_id = span.trace_id
    if not trace_id:
        return None
    members = {span.span_id: span for span in spans if span.trace_id == trace_id}
    roots = []
    for span in sorted(members.values(), key=lambda s: s.start_ns):
        parent = members.get(span.parent_span_id)
        (parent.children if parent is not None else roots).append(span)
    return GenerationTrace(trace_id, roots, len(members))


def walk(trace: GenerationTrace) -> Iterator[tuple[int, SpanNode]]:
    """(depth, span) in tree order: parents before children, siblings by start time."""
    stack = [(0, root) for root in reversed(trace.roots)]
    while stack:
        depth, span = stack.pop()
        yield depth, span
        stack.extend((depth + 1, child) for child in reversed(span.children))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=pathlib.Path, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.port, args.dir))


if __name__ == "__main__":
    main()
