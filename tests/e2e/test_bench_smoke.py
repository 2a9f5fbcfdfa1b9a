"""`make bench` in its smoke shape: every benchmark runs once with tiny counts and the run ends
with its JSON line of figures, so a benchmark that stops working fails `make test` instead of
only the next full `make bench`. No figure is judged here, but no request may fail.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from bench.__main__ import HEADLINE
from deploy.local.stack import REPO_ROOT

pytestmark = pytest.mark.integration

# Its own stack, replicas and gateways: ~80 s on an idle 2-core machine; the margin is for
# a loaded CI machine, not for a benchmark that has grown.
SMOKE_TIMEOUT_S = 300
STOP_GRACE_S = 90  # for the stack's own shutdown after a Ctrl-C


@pytest.mark.timeout(SMOKE_TIMEOUT_S + STOP_GRACE_S + 30)
def test_every_benchmark_runs_and_the_last_line_holds_every_headline_figure():
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--smoke"], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # Ctrl-C, so that its `finally` blocks stop the stack and replicas it started (each
        # in a session of its own, out of reach of a kill here).
        bench.send_signal(signal.SIGINT)
        try:
            stdout, stderr = bench.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            bench.kill()
            stdout, stderr = bench.communicate()
        pytest.fail(f"the smoke bench ran past {SMOKE_TIMEOUT_S} s:\n{stdout[-4000:]}\n"
                    f"{stderr[-4000:]}")
    report = f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
    assert bench.returncode == 0, report
    lines = stdout.strip().splitlines()
    assert lines, report
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict), report
    assert not [name for name in HEADLINE if name not in figures], report
