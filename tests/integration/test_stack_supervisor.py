"""The embedded stack's supervisor over real (tiny) child processes: a process that dies is
restarted after its backoff, the delay doubles while it keeps dying young and starts afresh once
it stayed up, each exit and restart is written to its log and to supervisor.json."""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest

from deploy.local.supervisor import Backoff, Supervisor, load_status
from services.common.processes import ChildProcess, pid_alive

pytestmark = pytest.mark.integration


def test_backoff_doubles_up_to_its_cap():
    backoff = Backoff(first_delay_s=0.5, max_delay_s=3.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_killed_process_is_restarted_with_backoff(tmp_path: pathlib.Path):
    child = ChildProcess("sleeper", ["sleep", "60"], tmp_path / "logs" / "sleeper.log")
    child.start()
    now = [1000.0]
    supervisor = Supervisor(tmp_path, Backoff(first_delay_s=1.0, max_delay_s=4.0, stable_s=30.0),
                            clock=lambda: now[0])
    restarted: list[int] = []
    supervisor._on_restart = lambda: restarted.append(child.pid)
    supervisor.watch(child)
    try:
        first = child.pid
        os.kill(first, signal.SIGKILL)
        child.process.wait(5)
        now[0] += 40.0
        supervisor.check(now[0])  # it had been up 40 s: the first delay
        assert child.pid == first and supervisor.status()["sleeper"]["restarting_in_s"] == 1.0
        now[0] += 0.5
        supervisor.check(now[0])  # not yet
        assert not child.alive()
        now[0] += 0.6
        supervisor.check(now[0])
        assert child.alive() and child.pid != first and restarted == [child.pid]
        second = child.pid
        os.kill(second, signal.SIGKILL)
        child.process.wait(5)
        now[0] += 1.0
        supervisor.check(now[0])  # died young: twice the delay
        assert supervisor.status()["sleeper"]["restarting_in_s"] == 2.0
        now[0] += 2.0
        supervisor.check(now[0])
        assert child.alive() and supervisor.restarts() == {"sleeper": 2}
        status = load_status(tmp_path)
        assert status is not None and status["processes"]["sleeper"]["restarts"] == 2
        assert status["processes"]["sleeper"]["last_exit"] == -signal.SIGKILL
        log = (tmp_path / "logs" / "sleeper.log").read_text()
        assert "exited with signal SIGKILL" in log and "restarted as pid" in log
        assert "restart #2" in (tmp_path / "logs" / "supervisor.log").read_text()
    finally:
        supervisor.stop()
        child.stop(grace_s=0)
    assert load_status(tmp_path) is None


def test_the_thread_restarts_on_its_own_and_stops_restarting_when_stopped(tmp_path):
    child = ChildProcess("sleeper", ["sleep", "60"], tmp_path / "sleeper.log")
    child.start()
    supervisor = Supervisor(tmp_path, Backoff(first_delay_s=0.05), interval_s=0.02)
    supervisor.watch(child)
    supervisor.start()
    try:
        first = child.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (child.pid == first or not child.alive()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.alive() and child.pid != first
    finally:
        supervisor.stop()
    last = child.pid
    os.kill(last, signal.SIGKILL)
    _wait_dead(last)
    time.sleep(0.2)
    assert not child.alive()
