"""Rules about our own source that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("services", "backends", "deploy", "meshctl", "bench")


def _calls_wait_for(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "wait_for"
            and isinstance(node.value, ast.Name) and node.value.id == "asyncio"
            or isinstance(node, ast.ImportFrom) and node.module == "asyncio"
            and any(alias.name == "wait_for" for alias in node.names)]


def test_no_asyncio_wait_for_in_long_lived_code():
    """Python 3.11's `asyncio.wait_for` returns the inner result when the caller is cancelled at
    the moment the inner await completes: the cancellation is lost, a loop keeps running, and
    whoever awaits the cancelled task hangs for ever (a CI run lost 300 s to it in the placement
    leader). `async with asyncio.timeout(...)` delivers every cancellation."""
    found = [f"{path.relative_to(ROOT)}:{line}"
             for package in PRODUCTION for path in sorted((ROOT / package).rglob("*.py"))
             for line in _calls_wait_for(path)]
    assert not found, f"use `async with asyncio.timeout(...)` instead at: {found}"
