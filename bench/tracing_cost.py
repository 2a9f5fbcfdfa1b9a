"""What tracing costs: the same streamed generations through a gateway that traces every one
(sampling 100 %, exporting to the stack's trace receiver) and through the benchmarks' gateway,
which traces nothing (no endpoint: the no-op path), both in front of the same schedulers and
Triton, measured in alternating rounds (`tls_cost.compare_alternating`).

The traced gateway is a second gateway process beside the benchmarks' stack (started in a few
seconds, where a second stack takes tens): the figure is the gateway's cost, which makes all
but one of a generation's spans; the scheduler's one span per route is not in it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from bench.tls_cost import compare_alternating
from deploy.local.gateways import ExtraGateway
from deploy.local.stack import StackInfo, start_trace_receiver
from deploy.local.traces import read_spans


def run(stack: StackInfo, state_dir: pathlib.Path, **shape: float) -> dict[str, float]:
    """Starts the receiver and the traced gateway beside `stack`, compares, stops them (the
    gateway first: it exports what it holds as it stops) and counts the spans received."""
    traces_dir = state_dir / "tracing-cost"
    receiver, tracing = start_trace_receiver(traces_dir, state_dir / "logs" / "traces.log",
                                             1.0, time.monotonic() + 30.0)
    try:
        gateway = ExtraGateway(stack, state_dir, name="gateway-traced", settings=tracing)
        gateway.start()
        try:
            traced = dataclasses.replace(
                stack, gateway=gateway.endpoint,
                endpoints={**stack.endpoints, "gateway": gateway.endpoint},
                pids={**stack.pids, "gateway": gateway.process.pid})
            figures = compare_alternating("tracing", ("untraced", stack), ("traced", traced),
                                          **shape)
        finally:
            gateway.stop()
    finally:
        receiver.stop(grace_s=5.0)
    figures["tracing_spans_received"] = sum(1 for _ in read_spans(traces_dir))
    return figures
