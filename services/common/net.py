"""Loopback addresses and free ports for the embedded stack and the tests."""

from __future__ import annotations

import pathlib
import random
import socket

LOOPBACK = "127.0.0.1"
LOWEST_PORT = 10_000
_handed_out: set[int] = set()  # ports this process gave a user: never given twice


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections, port-0 binds)."""
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on loopback now, for a child process to bind a moment later. Chosen below
    the kernel's ephemeral range, so no outgoing connection or port-0 bind takes it meanwhile,
    and never one this process already handed out (a stack hands out dozens at once)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(LOWEST_PORT, low) if low > LOWEST_PORT + 1000 else 0
        if port and (port in _handed_out or not _bindable(port)):
            continue
        if not port:  # no room below the ephemeral range: let the OS pick
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = sock.getsockname()[1]
            if port in _handed_out:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free loopback port found in 200 tries")
