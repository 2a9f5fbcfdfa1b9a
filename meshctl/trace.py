"""`meshctl trace REQUEST_ID`: the span tree of one generation, from the traces the embedded
stack's receiver wrote (`meshctl stack up --traces DIR`) — for an operator asking "where did
this slow or failed generation spend its time?"."""

from __future__ import annotations

import pathlib
from typing import Any

import typer

from meshctl.config import DEFAULT_STATE_DIR
from meshctl.exits import ExitCode
from meshctl.output import OUTPUT, Column, OutputFormat, emit

# What the DETAILS column shows of a span's attributes, in this order.
DETAIL_ATTRIBUTES = {
    "infermesh.replica_id": "replica", "infermesh.routing.score": "score",
    "gen_ai.usage.input_tokens": "in", "gen_ai.usage.output_tokens": "out",
    "gen_ai.response.finish_reasons": "finish", "infermesh.status_code": "code",
}


def rows(trace_data: dict[str, Any]) -> list[dict[str, Any]]:
    """The tree as table rows, depth first, each with its depth."""
    out: list[dict[str, Any]] = []
    pending = [(0, root) for root in reversed(trace_data["roots"])]
    while pending:
        depth, span = pending.pop()
        out.append({**span, "depth": depth})
        pending.extend((depth + 1, child) for child in reversed(span["children"]))
    return out


def _details(span: dict[str, Any]) -> str:
    parts = []
    for key, label in DETAIL_ATTRIBUTES.items():
        value = span["attributes"].get(key)
        if value is not None:
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, float):
                value = f"{value:.3g}"
            parts.append(f"{label}={value}")
    parts.extend(f"{event['name']}@{event['offset_ms']:.1f}ms" for event in span["events"])
    return " ".join(parts)


COLUMNS = [
    Column("SPAN", lambda s: "  " * s["depth"] + s["name"]),
    Column("SERVICE", lambda s: s["service"]),
    Column("START MS", lambda s: f"{s['start_offset_ms']:.1f}", right=True),
    Column("DURATION MS", lambda s: f"{s['duration_ms']:.1f}", right=True),
    Column("STATUS", lambda s: s["status"] or "-"),
    Column("DETAILS", _details),
    Column("SPAN ID", lambda s: s["span_id"], wide=True),
]


def trace(
    request_id: str = typer.Argument(..., help="The generation's request id."),
    traces_dir: pathlib.Path = typer.Option(
        None, "--traces-dir", help="Where the trace receiver writes (default: the stack's, "
        "from `stack up --traces`)."),
    state_dir: pathlib.Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir"),
    output: OutputFormat = OUTPUT,
) -> None:
    """Print the span tree of one generation with timings (offsets from its start)."""
    from deploy.local.state import load_state
    from deploy.local.traces import generation_trace

    if traces_dir is None:
        info = load_state(state_dir)
        if info is None or not info.traces_dir:
            typer.echo(f"error: no --traces-dir, and no stack with traces in {state_dir} "
                       "(start it with `meshctl stack up --traces DIR`)", err=True)
            raise typer.Exit(ExitCode.USAGE)
        traces_dir = pathlib.Path(info.traces_dir)
    found = generation_trace(traces_dir, request_id)
    if found is None:
        typer.echo(f"error: NOT_FOUND: no trace of request {request_id!r} in {traces_dir} "
                   "(sampled out, or not exported yet)", err=True)
        raise typer.Exit(ExitCode.NOT_FOUND)
    data = found.as_dict()
    emit(output, data, COLUMNS, rows(data), after=f"trace {found.trace_id}: {found.spans} spans")
