"""The embedded stack's supervisor: a thread that restarts any child process that dies, with
backoff, as the kubelet does for a pod's containers.

    alive ──exits (any code, any signal)──▶ waiting (backoff) ──▶ restarted (same argv, ports, env)

The delay doubles from `first_delay_s` up to `max_delay_s` while a process keeps dying soon after
each start, and falls back to `first_delay_s` once it has stayed up `stable_s`. Each exit and
restart is logged to `supervisor.log` and to the process's own log, and the state of every
process (pid, restarts, last exit) is written to `supervisor.json` in the stack's state
directory, which `meshctl stack status` reads from any process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.processes import ChildProcess

__all__ = ["Backoff", "ProcessState", "Supervisor", "load_status"]

STATUS_FILE = "supervisor.json"


@dataclass(frozen=True)
class Backoff:
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    stable_s: float = 30.0  # up this long, a process's next death starts the backoff afresh

    def delay(self, quick_deaths: int) -> float:
        """The wait before the restart that follows `quick_deaths` deaths in a row (>= 1)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, quick_deaths - 1))


@dataclass
class ProcessState:
    """What the supervisor knows of one child."""

    child: ChildProcess
    before_restart: Callable[[], None] | None = None  # e.g. clear what a killed Triton left
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None  # set while it is dead and waiting for its restart
    history: list[str] = field(default_factory=list)  # the latest exits, newest last


class Supervisor:
    """Watches children registered with `watch`; `check(now)` is one pass (tests call it with
    their own clock), `start()` runs passes every `interval_s` on a daemon thread."""

    def __init__(self, state_dir: pathlib.Path, backoff: Backoff = Backoff(),
                 interval_s: float = 0.2, clock: Callable[[], float] = time.monotonic,
                 on_restart: Callable[[], None] | None = None):
        """`on_restart()` after each pass that restarted something (e.g. record the new pids)."""
        self._on_restart = on_restart
        self._state_dir = state_dir
        self._log_path = state_dir / "logs" / "supervisor.log"
        self._backoff = backoff
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, ProcessState] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, child: ChildProcess, before_restart: Callable[[], None] | None = None) -> None:
        """Supervises `child` (already started) from now on."""
        with self._lock:
            self._states[child.name] = ProcessState(child, before_restart,
                                                    started_at=self._clock())
        self._write_status()

    def forget(self, name: str) -> None:
        with self._lock:
            self._states.pop(name, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stack supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops restarting; returns once the thread has ended (a restart under way finishes)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
        with contextlib.suppress(OSError):
            (self._state_dir / STATUS_FILE).unlink()

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {name: state.restarts for name, state in self._states.items()}

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.check(self._clock())
            except Exception as exc:  # never let the supervisor itself die
                self._say(f"supervisor pass failed: {exc!r}")

    def check(self, now: float) -> None:
        """Notices exits, schedules restarts, and performs those that are due."""
        changed = restarted = False
        with self._lock:
            states = list(self._states.items())
        for name, state in states:
            if self._stopping.is_set():
                return
            child = state.child
            if state.restart_at is None:
                if child.alive():
                    continue
                code = child.process.returncode if child.process is not None else None
                state.last_exit = code
                lived = now - state.started_at
                state.quick_deaths = 1 if lived >= self._backoff.stable_s else (
                    state.quick_deaths + 1)
                delay = self._backoff.delay(state.quick_deaths)
                state.restart_at = now + delay
                state.history = [*state.history[-4:], f"exit {code} after {lived:.1f}s"]
                self._say(f"{name} (pid {child.pid}) exited with {_describe(code)} after "
                          f"{lived:.1f}s; restart #{state.restarts + 1} in {delay:.1f}s",
                          child)
                changed = True
            if state.restart_at is not None and now >= state.restart_at:
                try:
                    if state.before_restart is not None:
                        state.before_restart()
                    child.start()
                except Exception as exc:
                    self._say(f"{name} failed to restart: {exc!r}", child)
                    state.quick_deaths += 1
                    state.restart_at = now + self._backoff.delay(state.quick_deaths)
                    continue
                state.restarts += 1
                state.started_at = now
                state.restart_at = None
                self._say(f"{name} restarted as pid {child.pid} (restart #{state.restarts})",
                          child)
                changed = restarted = True
        if changed:
            self._write_status()
        if restarted and self._on_restart is not None:
            self._on_restart()

    def status(self) -> dict[str, dict[str, object]]:
        now = self._clock()
        with self._lock:
            return {
                name: {
                    "pid": state.child.pid if state.child.process is not None else None,
                    "alive": state.child.alive(),
                    "restarts": state.restarts,
                    "last_exit": state.last_exit,
                    "up_s": round(now - state.started_at, 1) if state.restart_at is None else 0.0,
                    "restarting_in_s": None if state.restart_at is None
                    else round(max(0.0, state.restart_at - now), 1),
                    "history": list(state.history),
                }
                for name, state in self._states.items()
            }

    def _write_status(self) -> None:
        path = self._state_dir / STATUS_FILE
        staged = path.with_suffix(".json.tmp")
        with contextlib.suppress(OSError):
            staged.write_text(json.dumps({"supervisor_pid": os.getpid(),
                                          "written_at": time.time(),
                                          "processes": self.status()}, indent=2))
            staged.replace(path)

    def _say(self, line: str, child: ChildProcess | None = None) -> None:
        stamped = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervisor: {line}\n"
        for path in (self._log_path, child.log_path if child is not None else None):
            if path is None:
                continue
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as log:
                    log.write(stamped)


def _describe(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def load_status(state_dir: pathlib.Path) -> dict[str, object] | None:
    """What the stack's supervisor last wrote (None when no supervised stack runs there)."""
    path = state_dir / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
