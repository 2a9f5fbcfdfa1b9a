"""One gateway process's own cost: generations/s and CPU time per generation.

Every generation asks the stack's reference engine for one token, so the engine answers at once
next to what the mesh does per request, and every step runs as for any client: the bearer key
(auth), validation, the quota lease, fair admission, a Route and a Release at the scheduler, the
Triton stream, the audit event. The load is the Python SDK's shape: each client process keeps
one `GenerateStream` open and multiplexes its generations on it by request id, `CLIENT_PROCESSES`
processes with `concurrency` generations in flight in all.

The gateway's CPU is read from the kernel (`/proc/<pid>/stat`, user + system time of all its
threads) around the measured window, so `gateway_cpu_us_per_generation` is what one generation
costs that process, whatever else runs on the machine; generations/s is what it served in the
window, with the rest of the mesh (Triton, the scheduler, the load generator) on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from bench.pools import client_pool
from deploy.local.gateways import ExtraGateway
from deploy.local.stack import Stack, StackInfo, StackOptions
from infermesh.v1 import inference_pb2, inference_pb2_grpc

CLIENT_PROCESSES = 2
PROMPT = "Say one word."
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


@dataclass
class ClientResult:
    generations: int  # finished with stop or length, in the window
    errors: list[str]  # why the others failed (code: message)
    tokens: int


async def _drive(
    stack: StackInfo, model: str, concurrency: int, start_at: float, stop_at: float
) -> ClientResult:
    """`concurrency` generations in flight on one GenerateStream; counts those that start at or
    after `start_at` (wall clock, shared by the processes) and end before `stop_at`."""
    outbox: asyncio.Queue[inference_pb2.ClientFrame | None] = asyncio.Queue()
    waiting: dict[str, asyncio.Future[inference_pb2.Final]] = {}
    result = ClientResult(0, [], 0)

    async def frames():
        while (frame := await outbox.get()) is not None:
            yield frame

    async def one() -> inference_pb2.Final:
        request_id = uuid.uuid4().hex
        waiting[request_id] = asyncio.get_running_loop().create_future()
        outbox.put_nowait(inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
            request_id=request_id, model=model, prompt=PROMPT,
            params=inference_pb2.SamplingParams(max_tokens=1, seed=1))))
        return await waiting[request_id]

    async def worker() -> None:
        while (started := time.time()) < stop_at:
            final = await one()
            if started < start_at or time.time() > stop_at:
                continue
            if final.HasField("error"):
                result.errors.append(f"{final.error.code}: {final.error.message}")
            else:
                result.generations += 1
                result.tokens += final.usage.completion_tokens

    metadata = (("authorization", f"Bearer {stack.api_key}"),)
    async with stack.channel() as channel:
        call = inference_pb2_grpc.InferenceStub(channel).GenerateStream(frames(),
                                                                        metadata=metadata)

        async def read() -> None:
            async for reply in call:
                if reply.WhichOneof("frame") == "final":
                    waiting.pop(reply.final.request_id).set_result(reply.final)

        reader = asyncio.create_task(read())
        try:
            async with asyncio.timeout(stop_at - time.time() + 30.0):
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            outbox.put_nowait(None)
            async with asyncio.timeout(10.0):
                await reader
    return result


def client_process(*args) -> ClientResult:
    """Runs in a pool process: one share of the load."""
    return asyncio.run(_drive(*args))


def run(
    stack: StackInfo, concurrency: int = 32, duration_s: float = 10.0, warmup_s: float = 2.0,
    profile: pathlib.Path | None = None,
) -> dict[str, float]:
    """Drives one-token generations through the stack's gateway for `warmup_s`, then measures
    `duration_s`. The gateway's pid is read from `stack` (the supervisor keeps it current).
    `profile`: where py-spy writes the gateway's stacks sampled in the window (collapsed)."""
    shares = [concurrency // CLIENT_PROCESSES + (i < concurrency % CLIENT_PROCESSES)
              for i in range(CLIENT_PROCESSES)]
    with client_pool(CLIENT_PROCESSES) as pool:
        start_at = time.time() + warmup_s + 0.5  # + the clients' connecting
        stop_at = start_at + duration_s
        futures = [pool.submit(client_process, stack, stack.reference_model, share, start_at,
                               stop_at)
                   for share in shares if share]
        time.sleep(max(0.0, start_at - time.time()))
        pid = stack.pids["gateway"]
        sampler = None if profile is None else subprocess.Popen(
            [pathlib.Path(sys.executable).with_name("py-spy"), "record", "--pid", str(pid),
             "--duration", str(max(1, int(duration_s))), "--rate", "200", "--format", "raw",
             "--nonblocking", "--output", str(profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before, wall_before = process_cpu_s(pid), time.time()
        time.sleep(max(0.0, stop_at - time.time()))
        cpu_s, wall_s = process_cpu_s(pid) - cpu_before, time.time() - wall_before
        if sampler is not None:
            sampler.wait(timeout=60)
        results = [future.result() for future in futures]
    generations = sum(r.generations for r in results)
    errors = [e for r in results for e in r.errors]
    figures = {
        "gateway_generations_per_s_one_process": round(generations / wall_s, 1),
        "gateway_cpu_us_per_generation": round(cpu_s / max(1, generations) * 1e6, 1),
        "gateway_cpu_cores_busy": round(cpu_s / wall_s, 2),
        "gateway_throughput_concurrency": concurrency,
        "gateway_throughput_errors": len(errors),
    }
    print(f"gateway throughput: {figures['gateway_generations_per_s_one_process']:.0f} "
          f"generations/s at {concurrency} in flight, "
          f"{figures['gateway_cpu_us_per_generation']:.0f} µs gateway CPU per generation "
          f"({figures['gateway_cpu_cores_busy']:.2f} cores busy), {len(errors)} errors"
          + (f" (first: {errors[0]})" if errors else ""), flush=True)
    return figures


def top_frames(collapsed: pathlib.Path, count: int = 25) -> list[tuple[float, float, str]]:
    """The functions with most samples in a py-spy collapsed profile: (% of samples on the
    stack anywhere, % as the innermost frame, function)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            inclusive[frame] += int(samples)
    return [(100 * inclusive[f] / total, 100 * own[f] / total, f)
            for f, _ in inclusive.most_common(count)] if total else []


def compare(stack: StackInfo, state_dir: pathlib.Path, baseline: pathlib.Path, pairs: int,
            concurrency: int, duration_s: float) -> None:
    """This tree's gateway (the stack's) against one run from `baseline`, on the same stack, in
    alternating windows (the order flips every pair): on a shared machine one window's CPU per
    generation moves by ±20 %, a pair's ratio much less."""
    other = ExtraGateway(stack, state_dir, name="gateway-baseline", repo_root=baseline)
    other.start(timeout_s=60.0)
    against = dataclasses.replace(
        stack, gateway=other.endpoint, endpoints={**stack.endpoints, "gateway": other.endpoint},
        pids={**stack.pids, "gateway": other.process.pid})
    try:
        ratios = []
        for pair in range(pairs):
            order = (stack, against) if pair % 2 == 0 else (against, stack)
            cpu = {id(side): run(side, concurrency, duration_s)["gateway_cpu_us_per_generation"]
                   for side in order}
            ratios.append(cpu[id(stack)] / cpu[id(against)])
            print(f"pair {pair + 1}: this tree {cpu[id(stack)]:.0f} µs, {baseline} "
                  f"{cpu[id(against)]:.0f} µs per generation, ratio {ratios[-1]:.3f}", flush=True)
        print(json.dumps({"gateway_cpu_ratio_over_baseline_median": round(
            statistics.median(ratios), 3), "pairs": [round(r, 3) for r in ratios]}), flush=True)
    finally:
        other.stop()


def main() -> None:
    from bench.__main__ import BENCH_PLAN  # the bench tenant, not the quota, sets the pace

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1, help="Measured windows, one stack.")
    parser.add_argument("--profile", type=pathlib.Path,
                        help="Sample the gateway with py-spy in the last window: collapsed "
                        "stacks to this file, the top functions printed.")
    parser.add_argument("--against", type=pathlib.Path,
                        help="A/B: another checkout (protobuf code generated), e.g. a worktree "
                        "of the previous commit; a gateway from it beside this tree's, both on "
                        "one stack, measured in alternating windows, CPU ratios per pair.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        stack = Stack(StackOptions(state_dir=pathlib.Path(state), demo_plan=BENCH_PLAN))
        info = stack.up()
        try:
            if args.against is not None:
                compare(info, pathlib.Path(state), args.against, args.rounds, args.concurrency,
                        args.duration_s)
                return
            for round_ in range(args.rounds):
                last = round_ == args.rounds - 1
                figures = run(info, args.concurrency, args.duration_s,
                              profile=args.profile if last else None)
                print(json.dumps(figures, sort_keys=True), flush=True)
        finally:
            stack.down()
    if args.profile is not None:
        for inclusive, own, frame in top_frames(args.profile):
            print(f"{inclusive:5.1f}% {own:5.1f}% own  {frame}")


if __name__ == "__main__":
    main()
