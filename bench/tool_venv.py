"""Tools the bench runs beside the mesh (aiperf, LiteLLM's proxy), each in a virtual environment
of its own: their pins would fight the project's. Made on first use by `make bench`, from the
interpreter the project's own venv was made from; a smoke run never asks for one."""

from __future__ import annotations

import pathlib
import subprocess
import sys

INSTALL_TIMEOUT_S = 900


def tool_executable(requirement: str, venv: pathlib.Path, name: str) -> pathlib.Path | str:
    """`venv`'s `name` executable, installing `requirement` (pinned) there the first time; else
    why it cannot be had."""
    executable = venv / "bin" / name
    if executable.exists():
        return executable
    print(f"installing {requirement} into {venv} (once)", flush=True)
    try:
        subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True,
                       timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{requirement} could not be installed: {exc}"
    return executable
