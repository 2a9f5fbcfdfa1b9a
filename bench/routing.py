"""Routing: round robin vs least-loaded vs approximate KV/prefix-aware vs precise (the engines'
KV events), on four real reference replicas.

One run starts real etcd, four replicas (`deploy/local/replicas.py`: a Triton server with the
reference engine and its sidecar each) and one scheduler per routing policy. A client then plays
the same kind of workload against each scheduler in turn: chat sessions whose prompts start with
one of a few long system prompts and grow turn by turn (each turn repeats the previous prompt and
answer), mixed with unique prompts. For every request it calls `Scheduler.Route` (with the
prompt's prefix hashes from `services/common/prefix.py`), streams from the chosen Triton with the
gateway's own adapter, and releases the route. Each policy gets its own system prompts and
questions (drawn from the same distribution with another seed), so no policy finds the cache warmed
by the one before. The replicas' KV pools are too small for every system prompt, so a policy that
spreads a prefix over all replicas keeps evicting and prefilling it again. The system prompts are
the tenants of a multi-tenant fleet whose long shared prompts together exceed its KV cache (as
llm-d's precise-scheduling benchmark). Halfway through each policy's phase one replica's engine
restarts with an empty cache and then that policy's scheduler restarts (it loses its routing
history; a precise scheduler gets snapshots of what the engines hold); `kv_event_lag_ms_p99` is
the precise scheduler's engine → index lag over the run (both of its lives). Requests that reach
the restarting engine fail and are counted (`routing_<policy>_errors`).

It also reports, with `bench/route_decision.py`, the routing decision in process (the real
Router and scorers over 100 synthetic replicas) and the Route RPC round trip to a scheduler
process, the two costs behind a Route call per request vs a routing table streamed to gateways.

    python -m bench.routing [--rate 6] [--duration-s 20] [--replicas 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass

import aetcd
import grpc
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families

from backends.triton.adapter import EngineRequest, TritonAdapter
from bench import route_decision
from bench.streaming import percentile
from deploy.local.etcd_server import EtcdServer
from deploy.local.replicas import ReplicaSet, reference_repository
from deploy.local.stack import service_process, wait_serving
from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import status
from services.common.kv_blocks import prompt_blocks, word_token_ids
from services.common.net import LOOPBACK, free_port
from services.common.prefix import prompt_block_hashes
from services.common.processes import ChildProcess
from services.scheduler.outcome import Outcome
from services.scheduler.routing import Policy

MODEL = "routing-reference"
REPLICAS = 4
POLICIES = (Policy.ROUND_ROBIN, Policy.LEAST_LOADED, Policy.KV_AWARE, Policy.PRECISE)
BASELINE = Policy.ROUND_ROBIN
# The simulated accelerator of every replica. Prefill at 4,000 tokens/s and a 10 ms decode step
# are the proportions of a mid-size model on one GPU; a pool of 96 blocks of 64 tokens holds four
# or five system prompts and the requests running on them, not all twelve (so round robin keeps
# evicting), and the three a replica gets under prefix-aware routing with room to spare (five when
# the scorers, which cannot see what is cached, put more on one replica).
ENGINE = {
    "prefill_us_per_token": "250",
    "decode_step_ms": "10",
    "decode_step_ms_per_request": "0.5",
    "max_active_requests": "16",
    "kv_cache_blocks": "96",
    "kv_block_tokens": "64",
}
BLOCK_TOKENS = 64
SYSTEM_PROMPTS = 12
SYSTEM_PROMPT_WORDS = 1000
TURNS = 3  # per chat session; each turn's prompt is the last one, its answer and a question
UNIQUE_SHARE = 0.3  # sessions that are one request with a prompt nobody else sends
UNIQUE_PROMPT_WORDS = 150
QUESTION_WORDS = 20
OUTPUT_TOKENS = 24  # every answer exactly this long (min_tokens = max_tokens)
THINK_S = 0.2  # between an answer and the next turn's question
HOLD_S = 60.0
ROUTE_RETRY_S = 15.0  # a Route that finds the scheduler restarting is retried this long
VOCABULARY = [
    "the", "customer", "account", "order", "invoice", "policy", "shipping", "refund", "support",
    "product", "warranty", "please", "always", "never", "answer", "question", "carefully",
    "politely", "briefly", "detail", "explain", "assistant", "should", "must", "may", "include",
    "exclude", "price", "discount", "delivery", "return", "service", "contract", "team", "data",
    "privacy", "secure", "record", "update", "status", "request", "ticket", "priority", "escalate",
    "manager", "hours",
]


@dataclass(frozen=True)
class Turn:
    """One request of a session: its prompt is known once the previous answers are."""

    question: str


@dataclass(frozen=True)
class Session:
    start_s: float  # after the phase began
    opening: str  # the system prompt, or the whole unique prompt
    turns: tuple[Turn, ...]


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    error: str = ""


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(count))


def workload(seed: int, rate_per_s: float, duration_s: float) -> list[Session]:
    """Poisson session arrivals over `duration_s`; chat sessions pick a system prompt uniformly."""
    rng = random.Random(seed)
    systems = [f"System {seed}-{k}: the assistant of shop {k}. {_words(rng, SYSTEM_PROMPT_WORDS)}"
               for k in range(SYSTEM_PROMPTS)]
    sessions: list[Session] = []
    at = rng.expovariate(rate_per_s)
    while at < duration_s:
        if rng.random() < UNIQUE_SHARE:
            unique = f"Note {seed}-{len(sessions)}: {_words(rng, UNIQUE_PROMPT_WORDS)}"
            sessions.append(Session(at, unique, (Turn(_words(rng, QUESTION_WORDS)),)))
        else:
            turns = tuple(Turn(_words(rng, QUESTION_WORDS)) for _ in range(TURNS))
            sessions.append(Session(at, rng.choice(systems), turns))
        at += rng.expovariate(rate_per_s)
    return sessions


class Client:
    """Route → stream from the chosen Triton → Release, for one scheduler (one policy)."""

    def __init__(self, scheduler: scheduler_pb2_grpc.SchedulerStub, adapter: TritonAdapter):
        self._scheduler = scheduler
        self._adapter = adapter

    async def _route(self, prompt: str) -> scheduler_pb2.RouteResponse:
        """Route, as the gateway asks it (text prefix hashes and the prompt's KV blocks),
        retried while the scheduler restarts."""
        words = prompt.split()
        request = scheduler_pb2.RouteRequest(
            triton_model_name=MODEL, request_id=uuid.uuid4().hex,
            hold=status.seconds_to_duration(HOLD_S),
            prefix_hashes=prompt_block_hashes(prompt), prompt_tokens=len(words),
            kv_block_hashes=prompt_blocks(word_token_ids(words), BLOCK_TOKENS),
            kv_block_tokens=BLOCK_TOKENS,
        )
        deadline = time.monotonic() + ROUTE_RETRY_S
        while True:
            try:
                return await self._scheduler.Route(request, timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def generate(self, prompt: str, seed: int) -> tuple[Sample, str]:
        started = time.perf_counter()
        try:
            route = await self._route(prompt)
        except grpc.aio.AioRpcError as exc:
            return Sample(0.0, 0, f"route: {exc.code().name}: {exc.details()}"), ""
        request = EngineRequest(triton_model_name=MODEL, request_id=uuid.uuid4().hex,
                                prompt=prompt, max_tokens=OUTPUT_TOKENS,
                                min_tokens=OUTPUT_TOKENS, seed=seed)
        ttft, tokens, pieces, outcome, error = 0.0, 0, [], Outcome.OK, ""
        try:
            async with asyncio.timeout(60.0):
                async for chunk in self._adapter.generate(route.grpc_endpoint, request):
                    if chunk.text and not ttft:
                        ttft = time.perf_counter() - started
                    pieces.append(chunk.text)
                    tokens = chunk.completion_tokens
        except Exception as exc:  # a failed request is a sample too: counted, not fatal
            outcome = (Outcome.FAILED_AFTER_FIRST_TOKEN if ttft
                       else Outcome.FAILED_BEFORE_FIRST_TOKEN)
            error = repr(exc)
        with contextlib.suppress(grpc.aio.AioRpcError):  # a restarted scheduler forgot it
            await self._scheduler.Release(scheduler_pb2.ReleaseRouteRequest(
                reservation_id=route.reservation_id, outcome=_OUTCOMES[outcome],
                completion_tokens=tokens), timeout=5.0)
        return Sample(ttft, tokens, error), "".join(pieces)

    async def session(self, session: Session, index: int, samples: list[Sample]) -> None:
        prompt = session.opening
        for turn in session.turns:
            prompt = f"{prompt}\nUser: {turn.question}\nAssistant:"
            sample, answer = await self.generate(prompt, seed=index)
            samples.append(sample)
            if sample.error:
                return
            prompt += answer
            await asyncio.sleep(THINK_S)


_OUTCOMES = {
    Outcome.OK: scheduler_pb2.ROUTE_OUTCOME_OK,
    Outcome.FAILED_BEFORE_FIRST_TOKEN: scheduler_pb2.ROUTE_OUTCOME_FAILED_BEFORE_FIRST_TOKEN,
    Outcome.FAILED_AFTER_FIRST_TOKEN: scheduler_pb2.ROUTE_OUTCOME_FAILED_AFTER_FIRST_TOKEN,
}


async def play(client: Client, sessions: list[Session]) -> tuple[list[Sample], float]:
    """Starts every session at its time (open loop); returns the samples and the wall time."""
    samples: list[Sample] = []
    started = time.perf_counter()

    async def one(index: int, session: Session) -> None:
        await asyncio.sleep(max(0.0, session.start_s - (time.perf_counter() - started)))
        await client.session(session, index, samples)

    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    return samples, time.perf_counter() - started


def summarise(samples: list[Sample], wall_s: float) -> dict[str, float]:
    good = [s for s in samples if not s.error]
    ttfts = [s.ttft_s * 1000 for s in good]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(good),
        "ttft_p50_ms": round(percentile(ttfts, 50), 1),
        "ttft_p90_ms": round(percentile(ttfts, 90), 1),
        "ttft_p99_ms": round(percentile(ttfts, 99), 1),
        "requests_per_s": round(len(good) / wall_s, 2),
        "tokens_per_s": round(sum(s.tokens for s in good) / wall_s, 1),
    }


def prefill_tokens(replicas: ReplicaSet) -> dict[str, float]:
    """Prompt tokens the replicas' engines prefilled, by prefix-cache hit or miss, summed from
    their Triton metrics (`infermesh_engine_prefill_tokens_total`)."""
    totals = {"hit": 0.0, "miss": 0.0}
    for replica in replicas.replicas:
        url = f"http://{replica.metrics_endpoint}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "infermesh_engine_prefill_tokens_total"
                        and sample.labels.get("model") == MODEL):
                    totals[sample.labels["cache"]] += sample.value
    return totals


class Schedulers:
    """One scheduler process per policy, on the bench's etcd (placement off: the replicas keep
    the model they were started with)."""

    def __init__(self, root: pathlib.Path, etcd_endpoint: str):
        self.endpoints: dict[Policy, str] = {}
        self.metrics: dict[Policy, str] = {}
        self.lag_before_restart: dict[float, float] = {}  # the precise scheduler's, summed
        self.children: dict[Policy, ChildProcess] = {}
        for policy in POLICIES:
            port, metrics_port = free_port(), free_port()
            self.children[policy] = service_process(
                f"scheduler-{policy.value}", "services.scheduler",
                root / f"scheduler-{policy.value}.log", port,
                {"INFERMESH_TLS_MODE": "plaintext-development",
                 "INFERMESH_ETCD_ENDPOINT": etcd_endpoint,
                 "INFERMESH_ROUTING_POLICY": policy.value,
                 "INFERMESH_PLACEMENT_ENABLED": "false",
                 "INFERMESH_METRICS_PORT": str(metrics_port)})
            self.endpoints[policy] = f"{LOOPBACK}:{port}"
            self.metrics[policy] = f"{LOOPBACK}:{metrics_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for child in self.children.values():
            child.start()
        for policy, child in self.children.items():
            wait_serving(child, self.endpoints[policy], deadline)

    def restart(self, policy: Policy, timeout_s: float = 60.0) -> None:
        """Stops and starts one scheduler: what it learnt from routing is gone (its lag
        histogram, the precise one's, is kept in `lag_before_restart`)."""
        if policy is Policy.PRECISE:
            for bound, count in kv_event_lag_buckets(self.metrics[policy]).items():
                self.lag_before_restart[bound] = self.lag_before_restart.get(bound, 0.0) + count
        child = self.children[policy]
        child.stop(grace_s=10.0)
        child.start()
        wait_serving(child, self.endpoints[policy], time.monotonic() + timeout_s)

    def stop(self) -> None:
        for child in self.children.values():
            child.stop(grace_s=10.0)


def kv_event_lag_buckets(metrics_endpoint: str) -> dict[float, float]:
    """A scheduler's engine → index lag histogram: bucket bound (s) → cumulative count."""
    with urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {float(sample.labels["le"]): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "infermesh_scheduler_kv_event_lag_seconds_bucket"}


def p99_ms(buckets: dict[float, float]) -> float | None:
    """The 99th percentile, as the bound of the bucket it falls in (None: no sample)."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if not total:
        return None
    return next(round(bound * 1000, 1) for bound, count in ordered if count >= 0.99 * total)


async def disrupt(replicas: ReplicaSet, schedulers: Schedulers, policy: Policy,
                  after_s: float) -> None:
    """Mid-phase: the first replica's engine restarts with an empty cache, then the policy's
    scheduler restarts."""
    await asyncio.sleep(after_s)
    async with triton_aio.InferenceServerClient(replicas.replicas[0].grpc_endpoint) as triton:
        await triton.unload_model(MODEL)
        await triton.load_model(MODEL)
    await asyncio.to_thread(schedulers.restart, policy)


async def _measure(replicas: ReplicaSet, schedulers: Schedulers, etcd_endpoint: str,
                   rate_per_s: float, duration_s: float, warmup_s: float,
                   disruptions: bool) -> dict[str, float | None]:
    host, port = etcd_endpoint.rsplit(":", 1)
    async with aetcd.Client(host, int(port), timeout=5) as client:
        await replicas.wait_registered(client, timeout_s=60, models=[MODEL])
    await asyncio.sleep(2.0)  # every scheduler's watch has the records and a load report
    figures: dict[str, float | None] = {}
    adapter = TritonAdapter(None)
    try:
        results = {}
        for round_index, policy in enumerate(POLICIES):
            async with grpc.aio.insecure_channel(schedulers.endpoints[policy]) as channel:
                client = Client(scheduler_pb2_grpc.SchedulerStub(channel), adapter)
                # Warm the processes and channels on prompts no measured session shares.
                warm = workload(seed=1000 + round_index, rate_per_s=8.0, duration_s=warmup_s)
                await play(client, [Session(0.0, s.opening[:200], s.turns[:1]) for s in warm])
                sessions = workload(seed=round_index, rate_per_s=rate_per_s,
                                    duration_s=duration_s)
                before = await asyncio.to_thread(prefill_tokens, replicas)
                disrupting = (asyncio.create_task(disrupt(replicas, schedulers, policy,
                                                          duration_s / 2))
                              if disruptions else None)
                samples, wall_s = await play(client, sessions)
                if disrupting is not None:
                    await disrupting
                # A restarted engine counts from zero: its hits and misses since are in `after`.
                after = await asyncio.to_thread(prefill_tokens, replicas)
                results[policy] = summary = summarise(samples, wall_s)
                hit, miss = (max(0.0, after[c] - before[c]) for c in ("hit", "miss"))
                summary["prefix_hit_rate"] = round(hit / (hit + miss), 3) if hit + miss else 0.0
                errors = sorted({s.error for s in samples if s.error})[:3]
                print(f"routing {policy.value:>12}: ttft p50 {summary['ttft_p50_ms']:7.1f} "
                      f"p90 {summary['ttft_p90_ms']:7.1f} p99 {summary['ttft_p99_ms']:7.1f} ms, "
                      f"{summary['requests_per_s']:5.2f} req/s, {summary['tokens_per_s']:6.1f} "
                      f"tok/s, {summary['prefix_hit_rate']:.0%} of prefill tokens cached "
                      f"({summary['requests']} req, {summary['errors']} err) {errors or ''}",
                      flush=True)
                for key, value in summary.items():
                    figures[f"routing_{policy.value}_{key}"] = value
    finally:
        await adapter.close()
    base = results[BASELINE]
    for policy in POLICIES:
        if policy is not BASELINE:
            figures[f"{policy.value}_p90_ttft_speedup_vs_rr"] = round(
                base["ttft_p90_ms"] / results[policy]["ttft_p90_ms"], 2)
    figures["kv_routing_p90_ttft_speedup_vs_rr"] = figures.pop("kv_aware_p90_ttft_speedup_vs_rr")
    figures["precise_p90_ttft_speedup_vs_approximate"] = round(
        results[Policy.KV_AWARE]["ttft_p90_ms"] / results[Policy.PRECISE]["ttft_p90_ms"], 2)
    lag = await asyncio.to_thread(kv_event_lag_buckets, schedulers.metrics[Policy.PRECISE])
    lag = {bound: count + schedulers.lag_before_restart.get(bound, 0.0)
           for bound, count in lag.items()}
    figures["kv_event_lag_ms_p99"] = p99_ms(lag)
    print(f"routing p90 TTFT vs round robin: precise "
          f"{figures['precise_p90_ttft_speedup_vs_rr']}x lower, kv_aware "
          f"{figures['kv_routing_p90_ttft_speedup_vs_rr']}x, least_loaded "
          f"{figures['least_loaded_p90_ttft_speedup_vs_rr']}x; precise vs approximate "
          f"{figures['precise_p90_ttft_speedup_vs_approximate']}x; KV event lag p99 "
          f"{figures['kv_event_lag_ms_p99']} ms", flush=True)
    return figures


def run(rate_per_s: float = 6.0, duration_s: float = 20.0, replica_count: int = REPLICAS,
        warmup_s: float = 1.0, decision_samples: int = 5000, rpc_samples: int = 2000,
        stream_samples: int = 20000, disruptions: bool = True) -> dict[str, float | None]:
    """The whole routing benchmark; `rate_per_s`: session arrivals per policy phase, for
    `duration_s` (after `warmup_s` of warm-up sessions); `decision_samples`, `rpc_samples` and
    `stream_samples`: routing decisions timed in process, over unary gRPC and over a stream;
    `disruptions`: the mid-phase engine and scheduler restarts."""
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-routing-") as state:
        root = pathlib.Path(state)
        etcd_server = EtcdServer(root / "etcd", root / "etcd.log")
        etcd_server.start()
        try:
            repository = reference_repository(root / "models", [MODEL], ENGINE)
            replicas = ReplicaSet(root / "replicas", etcd_server.endpoint, replica_count,
                                  model_repository=repository, models=[MODEL])
            schedulers = Schedulers(root, etcd_server.endpoint)
            replicas.start()
            try:
                schedulers.start()
                try:
                    figures = asyncio.run(_measure(replicas, schedulers, etcd_server.endpoint,
                                                   rate_per_s, duration_s, warmup_s,
                                                   disruptions))
                finally:
                    schedulers.stop()
            finally:
                replicas.stop()
        finally:
            etcd_server.stop()
    figures.update(decision_costs(decision_samples, rpc_samples, stream_samples))
    return figures


def decision_costs(decision_samples: int = 5000, rpc_samples: int = 2000,
                   stream_samples: int = 20000) -> dict[str, float]:
    """The in-process decision, the unary Route RPC round trip and the same over the gateway's
    `RouteStream`, as `bench/route_decision.py` measures them (100 replicas), under this
    benchmark's names. The in-process rate is what routing in the gateway from a table streamed
    by the scheduler would sustain (no per-request RPC); the stream's is what the mesh does."""
    in_process = route_decision.decision_time_us(100, decision_samples, Policy.KV_AWARE)
    rpc = route_decision.rpc_round_trip_us(100, rpc_samples, stream_samples=stream_samples)
    one, many = rpc["concurrency_1"], rpc["concurrency_16"]
    stream_one, stream_many = rpc["stream_concurrency_1"], rpc["stream_concurrency_16"]
    figures = {
        "route_decision_us_p50_100_replicas": in_process["cpu"]["p50"],
        "route_decision_us_p99_100_replicas": in_process["cpu"]["p99"],
        "route_decision_wall_us_p99_100_replicas": in_process["wall"]["p99"],
        "route_rpc_us_p50_100_replicas": one["p50"],
        "route_rpc_us_p99_100_replicas": one["p99"],
        "route_rpc_us_p50_16_callers": many["p50"],
        "route_rpc_routes_per_s_16_callers": many["routes_per_s"],
        "route_rpc_over_decision_p50": round(one["p50"] / in_process["cpu"]["p50"], 1),
        "route_decisions_per_s_in_process": round(1e6 / in_process["cpu"]["p50"]),
        "route_stream_us_p50_100_replicas": stream_one["p50"],
        "route_stream_us_p99_100_replicas": stream_one["p99"],
        "route_stream_us_p50_16_callers": stream_many["p50"],
        "route_stream_routes_per_s_16_callers": stream_many["routes_per_s"],
        "route_decisions_per_s_one_process": rpc["stream_concurrency_64"]["routes_per_s"],
        "route_stream_over_rpc_routes_per_s_16_callers": round(
            stream_many["routes_per_s"] / many["routes_per_s"], 2),
        "route_rpc_scheduler_cpu_us_per_route_16_callers": many["scheduler_cpu_us_per_route"],
        "route_stream_scheduler_cpu_us_per_route_64_callers":
            rpc["stream_concurrency_64"]["scheduler_cpu_us_per_route"],
        "route_rpc_caller_cpu_us_per_route_16_callers": many["caller_cpu_us_per_route"],
        "route_stream_caller_cpu_us_per_route_64_callers":
            rpc["stream_concurrency_64"]["caller_cpu_us_per_route"],
    }
    print(f"routing decision in process (100 replicas, kv_aware, CPU time): p50 "
          f"{figures['route_decision_us_p50_100_replicas']} / p99 "
          f"{figures['route_decision_us_p99_100_replicas']} µs; Route RPC round trip: p50 "
          f"{figures['route_rpc_us_p50_100_replicas']} / p99 "
          f"{figures['route_rpc_us_p99_100_replicas']} µs "
          f"({figures['route_rpc_over_decision_p50']}x the decision at p50), "
          f"{figures['route_rpc_routes_per_s_16_callers']} routes/s with 16 callers; "
          f"RouteStream: p50 {figures['route_stream_us_p50_100_replicas']} µs, "
          f"{figures['route_stream_routes_per_s_16_callers']} routes/s with 16 callers "
          f"({figures['route_stream_over_rpc_routes_per_s_16_callers']}x unary), "
          f"{figures['route_decisions_per_s_one_process']} with 64; scheduler CPU per route "
          f"{figures['route_rpc_scheduler_cpu_us_per_route_16_callers']} µs unary, "
          f"{figures['route_stream_scheduler_cpu_us_per_route_64_callers']} µs streamed",
          flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=6.0, help="Session arrivals per second.")
    parser.add_argument("--duration-s", type=float, default=20.0,
                        help="Sessions start during this long, per policy.")
    parser.add_argument("--replicas", type=int, default=REPLICAS)
    args = parser.parse_args()
    print(json.dumps(run(args.rate, args.duration_s, args.replicas), sort_keys=True))


if __name__ == "__main__":
    main()
