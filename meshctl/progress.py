"""Feedback on long work (`stack up`, `engine calibrate`): a spinner on stderr, so stdout stays
the command's result. Without a terminal it prints the line once instead of animating."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer


@contextlib.contextmanager
def spinner(what: str) -> Iterator[None]:
    """Shows `what` with a spinner and the time elapsed while the block runs."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        typer.echo(f"{what} ...", err=True)
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        progress.add_task(what, total=None)
        yield
