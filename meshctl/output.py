"""How every read command prints: `-o table|json|yaml|wide`.

A command builds its result once as plain data (an SDK result's `to_dict()`, or `message_dict`
for a protobuf message: either way the API's JSON mapping, so field names are the proto's own
and stay stable) and describes its table as `Column`s over that data; `emit` renders it in the
format asked for. One renderer per format, none per command: the table a person reads and the
JSON a script parses cannot drift apart.
"""

from __future__ import annotations

import enum
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"
    wide = "wide"


def output_option(default: OutputFormat = OutputFormat.table) -> Any:
    return typer.Option(default, "--output", "-o", case_sensitive=False,
                        help="table (default), wide (more columns), json or yaml; JSON and YAML "
                        "field names are stable (the API's own).")


OUTPUT = output_option()


def message_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as output data: proto field names, every field present (zeros too),
    enums by name, timestamps as RFC 3339 and durations as `1.5s` strings."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict[str, Any]], Any]  # a row's data → what the cell shows
    wide: bool = False  # only in `-o wide`
    right: bool = False  # right-aligned (numbers)


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]], wide: bool) -> str:
    """A borderless rich table (kubectl's look): a header line, then a line per row; cells
    never wrap, so each row stays on one line whatever the terminal's width."""
    from rich.console import Console
    from rich.table import Table

    shown = [c for c in columns if wide or not c.wide]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold",
                  padding=(0, 2, 0, 0))
    for column in shown:
        table.add_column(column.header, no_wrap=True, overflow="fold",
                         justify="right" if column.right else "left")
    for row in rows:
        table.add_row(*(_text(column.cell(row)) for column in shown))
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, force_terminal=sys.stdout.isatty(),
            highlight=False).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def to_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False)


def emit(fmt: OutputFormat, data: Any, columns: Sequence[Column],
         rows: Sequence[dict[str, Any]] | None = None, after: str = "") -> None:
    """Prints `data` as JSON or YAML, or `rows` (default: `data`, a list) as a table with
    `columns` (plus the wide ones for `-o wide`) followed by `after` (a table's footnote)."""
    if fmt is OutputFormat.json:
        typer.echo(to_json(data))
    elif fmt is OutputFormat.yaml:
        typer.echo(to_yaml(data), nl=False)
    else:
        typer.echo(render_table(columns, data if rows is None else rows,
                                fmt is OutputFormat.wide))
        if after:
            typer.echo(after)


def is_structured(fmt: OutputFormat) -> bool:
    """JSON or YAML: stdout carries the data alone (notes go to stderr)."""
    return fmt in (OutputFormat.json, OutputFormat.yaml)
