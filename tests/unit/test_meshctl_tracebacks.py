"""meshctl never prints a frame's locals on an unexpected traceback (issue 15, class 9): they
hold the API key and the mesh token read from the env file."""

from __future__ import annotations

from meshctl.__main__ import app


def test_tracebacks_do_not_show_locals():
    assert app.pretty_exceptions_show_locals is False
