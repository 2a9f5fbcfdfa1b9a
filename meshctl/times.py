"""Durations and timestamps in meshctl: one parser and one printer for each, so every flag takes
the same spellings (`90s`, `15m`, `2h`, `7d`, `1w`, or an ISO-8601 time) and every table and
message prints them the same way (`2026-12-03T10:00:00Z`, `20.5 s`)."""

from __future__ import annotations

import datetime
import re

import typer

DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `15m`, `2h`, `1.5h`, `7d`, `1w`; a usage error (exit 2) otherwise."""
    match = DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r}: use a duration like 90s, 15m, 2h, 7d or 1w")
    return float(match.group(1)) * UNIT_S[match.group(2)]


def parse_time(text: str, *, future: bool = False,
               now: datetime.datetime | None = None) -> datetime.datetime:
    """An aware UTC time: an ISO-8601 time (UTC unless it says otherwise), or a duration from
    now — ago by default (`--since 2h`), ahead when `future` (`--expires 30d`)."""
    now = now or datetime.datetime.now(datetime.UTC)
    if DURATION.match(text.strip()):
        delta = datetime.timedelta(seconds=parse_duration(text))
        return now + delta if future else now - delta
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: use an ISO time (2026-12-03T10:00:00Z) or a duration like 2h") from None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).astimezone(datetime.UTC)


def format_time(value) -> str:
    """RFC 3339 in UTC to the second (`2026-12-03T10:00:00Z`), the form JSON output uses too;
    `-` for an unset time. Takes a datetime, a protobuf Timestamp, or Unix seconds."""
    if value is None:
        return "-"
    if hasattr(value, "ToDatetime"):  # google.protobuf.Timestamp
        if not value.seconds and not value.nanos:
            return "-"
        value = value.ToDatetime(datetime.UTC)
    elif isinstance(value, (int, float)):
        if not value:
            return "-"
        value = datetime.datetime.fromtimestamp(value, datetime.UTC)
    elif isinstance(value, str):  # already RFC 3339 (from a message dict)
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float | None) -> str:
    """`20.5 s`, `3.2 min`, `2.0 h`, `7.0 d` (`-` for None): seconds below two minutes."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if abs(seconds) >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
