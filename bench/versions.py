"""A pushed version's cold start, and a rollback's first token, on the stack's own replica.

Three figures, in one run against the embedded stack's replica (its sidecar, Triton and blob
cache), each from a client streaming one-token greedy chat generations through the stack's
gateway:

    version_cold_start_s          push of a new version (hash, upload, register) → its first
                                  token (see `via`), once the replica has fetched, verified,
                                  converted and loaded it. Its weights are salted
                                  (`weights.write_variant(salt=…)`): neither the replica's blob
                                  cache nor the engine's materialized copy holds them; only the
                                  tokenizer files, shared with the model's running version, are
                                  already there (a few MB).
    cold_start_fetch_over_local   that ÷ the same push → first token for a second version pinning
                                  the very same files (another description, so another version id
                                  and Triton model): the registry holds them (nothing uploaded;
                                  the push still hashes them), the replica's cache holds them
                                  (verified again, not downloaded) and so does the engine's
                                  materialized copy; Triton still starts and loads a model of its
                                  own. Goal ≤ 1.5: fetching must not dominate.
    rollback_first_token_ms       with the new version promoted and the model's earlier version
                                  as previous (both loaded), `ChangeRouting(rollback)` → the first
                                  token from the previous version, a new generation starting on
                                  the alias every PROBE_INTERVAL_S from before the call; the worst
                                  of `rounds` (each promotes the new version back first,
                                  unmeasured). Goal ≤ 1,000 ms.

How a pushed version gets placed and asked for (`via`): `canary` (the default) makes it a
CANARY_PERCENT canary right after the push, as an admin ships a version, asks the alias (which
production answers until the canary is loaded: one production generation of slack) and clears
the canary after its first token; the registry change starts a placement round at once. `pin`
only asks for it by id (refused with UNAVAILABLE, asked again every POLL_S): placed on demand,
it waits for the scheduler's next demand publication and placement round (up to ~10 s with the
defaults), which adds that much noise to both starts.

Engines: `torch` (the full run) pushes the demo model's second set of weights as a Hugging Face
directory (~540 MB) as a new version of `demo-chat`, its manifest derived as `meshctl registry
push DIR --name demo-chat` derives it; `reference` (the smoke) pushes a model of its own on the
reference engine with a pinned blob of REFERENCE_BLOB_BYTES random bytes: the same steps, but
none of the bytes or the load of the real model, so its figures say nothing about it.

    .venv/bin/python -m bench.versions [--engine torch|reference] [--rounds N] [--via canary|pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from backends.triton import weights
from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc, registry_pb2
from services.registry.client import MANIFEST_FILE, PushSource, RegistryClient, load_push_source

ENGINES = ("torch", "reference")
REFERENCE_MODEL = "bench-versions"
REFERENCE_BLOB_BYTES = 4 << 20
QUESTION = "What is the capital of France?"  # one user turn, rendered with the chat template
MAX_TOKENS = 1  # its text is the first token; a generation without text is not counted
POLL_S = 0.1  # between asks for a version that is not loaded yet
PROBE_INTERVAL_S = 0.05  # a new generation on the alias this often during a rollback...
PROBES_IN_FLIGHT = 2  # ... unless this many are still running (each one loads the engine)
CANARY_PERCENT = 100.0  # how a pushed version is placed (`via="canary"`)
VIA = ("canary", "pin")
COLD_START_TIMEOUT_S = 300.0  # push → first token, on a busy 2-core machine
ROUND_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
COLD_STARTS = "infermesh_sidecar_version_cold_start_seconds"
LOADS = 'infermesh_sidecar_placement_actions_total{action="load",outcome="ok"}'


@dataclass(frozen=True)
class Answer:
    """One streamed short generation: who served it, when its first text came, or why
    it was refused (a gRPC status name; "" when it was not)."""

    version: str = ""
    first_token_at: float | None = None
    refused: str = ""
    accepted_at: float | None = None  # when the gateway said which version serves it


@dataclass(frozen=True)
class Start:
    """One push → first token."""

    version_id: str
    push_s: float  # hash, upload (what the registry lacks) and register
    first_token_s: float  # from the push starting
    sidecar_s: float  # the sidecar's own fetch/verify/render/load (its cold-start histogram)
    refusals: int  # asks refused with UNAVAILABLE while the version was placed and loaded

    @property
    def other_s(self) -> float:
        """Neither the push nor the sidecar's load: the placement round (see `via`), the
        replica's record, routing and the first token itself."""
        return self.first_token_s - self.push_s - self.sidecar_s


class Client:
    """Streams short greedy chat generations (MAX_TOKENS) through the stack's gateway."""

    def __init__(self, stack: StackInfo, channel: grpc.aio.Channel):
        self._stub = inference_pb2_grpc.InferenceStub(channel)
        self._metadata = (("authorization", f"Bearer {stack.api_key}"),)
        self.errors = 0  # refusals other than UNAVAILABLE (a version not loaded yet)

    async def ask(self, model: str) -> Answer:
        frame = inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, model=model,
            messages=inference_pb2.Messages(messages=[
                inference_pb2.ChatMessage(role="user", content=QUESTION)]),
            params=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)))
        version, first, accepted = "", None, None
        try:
            async for reply in self._stub.GenerateStream(
                    iter([frame]), metadata=self._metadata, timeout=REQUEST_TIMEOUT_S):
                kind = reply.WhichOneof("frame")
                if kind == "accepted":
                    version, accepted = reply.accepted.model_version, time.monotonic()
                elif kind == "tokens" and first is None and reply.tokens.text:
                    first = time.monotonic()
                elif kind == "final":
                    if reply.final.HasField("error"):
                        return self._refused(version, reply.final.error.code)
                    return Answer(version or reply.final.model_version, first,
                                  accepted_at=accepted)
        except grpc.aio.AioRpcError as exc:
            return self._refused(version, exc.code().name)
        return self._refused(version, "the stream ended without a Final")

    def _refused(self, version: str, code: str) -> Answer:
        if code != grpc.StatusCode.UNAVAILABLE.name:
            self.errors += 1
            print(f"versions: refused: {code}", flush=True)
        return Answer(version, None, code)

    async def first_token(self, model: str, version: str, timeout_s: float) -> tuple[float, int]:
        """(when the first token `version` gave for `model` arrived, asks refused before it)."""
        deadline = time.monotonic() + timeout_s
        refusals = 0
        while True:
            answer = await self.ask(model)
            if answer.version == version and answer.first_token_at is not None:
                return answer.first_token_at, refusals
            refusals += answer.refused != ""
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} never answered from {version} within {timeout_s} s "
                                   f"(last: {answer})")
            await asyncio.sleep(POLL_S)


class Prober:
    """Starts a generation for a model every PROBE_INTERVAL_S (at most PROBES_IN_FLIGHT at
    once), whatever the earlier ones are doing; remembers when each version's first token
    came, and when the gateway accepted that generation."""

    def __init__(self, client: Client, model: str):
        self._client = client
        self._model = model
        self.first_token: dict[str, float] = {}
        self.first_accepted: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        running: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            if len(running) < PROBES_IN_FLIGHT:
                task = asyncio.create_task(self._one())
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.sleep(PROBE_INTERVAL_S)
        await asyncio.gather(*running)

    async def _one(self) -> None:
        answer = await self._client.ask(self._model)
        if answer.first_token_at is not None and (
                answer.first_token_at < self.first_token.get(answer.version, math.inf)):
            self.first_token[answer.version] = answer.first_token_at
            self.first_accepted[answer.version] = answer.accepted_at or answer.first_token_at

    async def wait_for(self, version: str, timeout_s: float) -> float:
        async with asyncio.timeout(timeout_s):
            while version not in self.first_token:
                await asyncio.sleep(0.005)
        return self.first_token[version]


def sidecar_metrics(stack: StackInfo) -> dict[str, float]:
    """The sidecar's cold-start histogram (`_sum`, `_count`) and its successful loads."""
    wanted = (f"{COLD_STARTS}_sum", f"{COLD_STARTS}_count", LOADS)
    with urllib.request.urlopen(f"http://{stack.metrics['sidecar']}/metrics", timeout=5) as page:
        lines = page.read().decode().splitlines()
    values = dict.fromkeys(wanted, 0.0)
    for line in lines:
        name, _, value = line.rpartition(" ")
        if name in values:
            values[name] = float(value)
    return values


def write_reference_source(directory: pathlib.Path, salt: str) -> pathlib.Path:
    """A model directory (manifest.json beside its one pinned file) on the reference engine:
    REFERENCE_BLOB_BYTES random bytes the engine never reads, but the replica still fetches,
    verifies and pins."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.bin").write_bytes(os.urandom(REFERENCE_BLOB_BYTES))
    manifest = json_format.MessageToDict(_reference_manifest(f"bench versions {salt}"),
                                         preserving_proto_field_name=True)
    manifest["weights"] = [{"name": "weights.bin"}]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


def _reference_manifest(description: str) -> registry_pb2.ModelManifest:
    return registry_pb2.ModelManifest(
        name=REFERENCE_MODEL, description=description, tokenizer="whitespace",
        engine=registry_pb2.EngineConfig(kind="reference", context_window=4096,
                                         max_output_tokens=256, max_batch_size=8),
        sampling=registry_pb2.SamplingDefaults(max_tokens=1, temperature=0.7, top_p=0.95),
    )


async def _push_and_serve(stack: StackInfo, registry: RegistryClient, client: Client,
                          source: pathlib.Path, name: str | None, description: str,
                          via: str) -> Start:
    """Pushes `source` (its manifest's description set to `description`: a version of its
    own), makes it a canary when `via` says so, and asks for it by id until its first token;
    then clears that canary (unmeasured)."""
    before = await asyncio.to_thread(sidecar_metrics, stack)
    started = time.monotonic()
    prepared: PushSource = await asyncio.to_thread(load_push_source, str(source), name)
    prepared.manifest.description = description
    model = prepared.manifest.name
    version_id = (await registry.push(prepared)).version_id
    pushed = time.monotonic()
    if via == "canary":  # the alias: production answers until the canary is loaded
        await registry.change(model, "bench: versions, place it", canary=registry_pb2.SetCanary(
            version_id=version_id, weight_percent=CANARY_PERCENT))
    first, refusals = await client.first_token(
        model if via == "canary" else f"{model}@{version_id}", version_id, COLD_START_TIMEOUT_S)
    routing = await registry.routing(model)
    if routing.canary == version_id:
        await registry.change(model, "bench: versions, placed", routing.revision,
                              clear_canary=registry_pb2.ClearCanary())
    elif via == "canary":
        print(f"versions: the canary {version_id} was cleared before its first token",
              flush=True)
    after = await asyncio.to_thread(sidecar_metrics, stack)
    loads = after[f"{COLD_STARTS}_count"] - before[f"{COLD_STARTS}_count"]
    if loads != 1:  # then the sidecar's figure is not this version's alone
        print(f"versions: the sidecar loaded {loads:g} versions for {version_id}", flush=True)
    return Start(version_id, pushed - started, first - started,
                 after[f"{COLD_STARTS}_sum"] - before[f"{COLD_STARTS}_sum"], refusals)


async def _serves(client: Client, model: str, version: str) -> None:
    await client.first_token(model, version, ROUND_TIMEOUT_S)


async def _rollback_round(registry: RegistryClient, client: Client, model: str,
                          production: str, previous: str) -> tuple[float, float]:
    """Promotes `production` (unmeasured) until the alias serves it, then times
    `ChangeRouting(rollback)` → the first token from `previous` (and → the gateway accepting
    that generation for `previous`: the routing switch alone), in ms."""
    routing = await registry.routing(model)
    if routing.production != production or routing.previous != previous:
        await registry.change(model, "bench: versions, back to the new version",
                              routing.revision, promote=registry_pb2.Promote(version_id=production))
    prober = Prober(client, model)
    stop = asyncio.Event()
    task = asyncio.create_task(prober.run(stop))
    try:
        await prober.wait_for(production, ROUND_TIMEOUT_S)  # served by the new version first
        revision = (await registry.routing(model)).revision
        started = time.monotonic()
        await registry.change(model, "bench: versions, rollback first token", revision,
                              rollback=registry_pb2.Rollback())
        await prober.wait_for(previous, ROUND_TIMEOUT_S)
    finally:
        stop.set()
        await task
    return ((prober.first_token[previous] - started) * 1000,
            (prober.first_accepted[previous] - started) * 1000)


async def _measure(stack: StackInfo, scratch: pathlib.Path, engine: str, rounds: int,
                   via: str) -> dict[str, float | int | str]:
    salt = uuid.uuid4().hex[:12]
    if engine == "torch":
        model, name = stack.model, stack.model
        source = await asyncio.to_thread(weights.write_variant, scratch / model,
                                         weights.cache_root(), salt)
    else:
        model, name = REFERENCE_MODEL, None
        source = write_reference_source(scratch / model, salt)
    try:
        return await _measure_pushes(stack, engine, rounds, via, model, name, source, salt)
    finally:
        if engine == "torch":  # the engine's copy of the salted weights: never asked for again
            derived = await asyncio.to_thread(load_push_source, str(source), name)
            weights_refs = [json_format.MessageToDict(ref, preserving_proto_field_name=True)
                            for ref in derived.manifest.weights]
            await asyncio.to_thread(
                shutil.rmtree, weights.materialized_dir(weights_refs, weights.cache_root()), True)


async def _measure_pushes(stack: StackInfo, engine: str, rounds: int, via: str, model: str,
                          name: str | None, source: pathlib.Path,
                          salt: str) -> dict[str, float | int | str]:
    async with RegistryClient(stack.endpoints["registry"], stack.api_key,
                              mesh_tls=stack.client_tls()) as registry, \
            stack.channel() as channel:
        client = Client(stack, channel)
        if engine == "reference":  # the model's earlier version, what a rollback returns to
            first = await registry.register(_reference_manifest(f"bench versions v1 {salt}"))
            await registry.change(model, "bench: versions setup",
                                  promote=registry_pb2.Promote(version_id=first.version_id))
        earlier = (await registry.routing(model)).production
        await _serves(client, model, earlier)
        cold = await _push_and_serve(stack, registry, client, source, name,
                                     f"bench versions {salt}: cold start", via)
        warm = await _push_and_serve(stack, registry, client, source, name,
                                     f"bench versions {salt}: the same files, warm cache", via)
        try:
            loads = (await asyncio.to_thread(sidecar_metrics, stack))[LOADS]
            rounds_ms = [await _rollback_round(registry, client, model, cold.version_id,
                                               earlier) for _ in range(rounds)]
            rollback_loads = (await asyncio.to_thread(sidecar_metrics, stack))[LOADS] - loads
        finally:  # whatever happened, the model's earlier version serves it again
            routing = await registry.routing(model)
            if routing.production != earlier:
                await registry.change(model, "bench: versions, restore", routing.revision,
                                      promote=registry_pb2.Promote(version_id=earlier))
        pinned = (await registry.version(f"{model}@{cold.version_id}")).manifest
    ratio = cold.first_token_s / warm.first_token_s
    rollback_ms = [token for token, _ in rounds_ms]
    accepted_ms = [accepted for _, accepted in rounds_ms]
    worst = max(rollback_ms)
    print(f"versions ({engine}, via {via}): cold start {cold.first_token_s:.2f} s (push "
          f"{cold.push_s:.2f} s, sidecar fetch+verify+render+load {cold.sidecar_s:.2f} s, "
          f"placement+routing+first token {cold.other_s:.2f} s); files already cached "
          f"{warm.first_token_s:.2f} s (push "
          f"{warm.push_s:.2f} s, sidecar {warm.sidecar_s:.2f} s, placement+routing+first token "
          f"{warm.other_s:.2f} s): cold/cached {ratio:.2f} (goal <= 1.5)", flush=True)
    print(f"versions ({engine}): rollback -> first token of the previous version: max "
          f"{worst:.0f} ms, p50 {statistics.median(rollback_ms):.0f} ms over {rounds} rounds "
          f"({', '.join(f'{ms:.0f}' for ms in rollback_ms)}; accepted for it: "
          f"{', '.join(f'{ms:.0f}' for ms in accepted_ms)}), {rollback_loads:g} model loads "
          f"(goal <= 1000 ms, 0 loads)", flush=True)
    return {
        "version_bench_engine": engine,
        "version_bench_placed_via": via,
        "version_bytes": sum(ref.size_bytes for ref in [*pinned.weights,
                                                         *pinned.tokenizer_files]),
        "version_cold_start_s": round(cold.first_token_s, 2),
        "version_cold_start_push_s": round(cold.push_s, 2),
        "version_cold_start_sidecar_s": round(cold.sidecar_s, 2),
        "version_cold_start_other_s": round(cold.other_s, 2),
        "version_cold_start_refusals": cold.refusals,
        "version_cached_start_s": round(warm.first_token_s, 2),
        "version_cached_start_push_s": round(warm.push_s, 2),
        "version_cached_start_sidecar_s": round(warm.sidecar_s, 2),
        "version_cached_start_other_s": round(warm.other_s, 2),
        "cold_start_fetch_over_local": round(ratio, 3),
        "rollback_first_token_rounds": rounds,
        "rollback_first_token_ms": round(worst, 1),
        "rollback_first_token_ms_p50": round(statistics.median(rollback_ms), 1),
        "rollback_first_accepted_ms_max": round(max(accepted_ms), 1),
        "rollback_first_token_model_loads": int(rollback_loads),
        "version_errors": client.errors,
    }


def run(stack: StackInfo, state_dir: pathlib.Path, engine: str = "torch", rounds: int = 5,
        via: str = "canary") -> dict[str, float | int | str]:
    """The figures above against `stack`; leaves the model's earlier version in production
    (the pushed versions stay registered and loaded: run it last)."""
    if engine not in ENGINES or via not in VIA:
        raise ValueError(f"engine {engine!r}, via {via!r}: one of {ENGINES}, one of {VIA}")
    with tempfile.TemporaryDirectory(prefix="versions-", dir=state_dir) as scratch:
        return asyncio.run(_measure(stack, pathlib.Path(scratch), engine, max(1, rounds), via))


def main() -> None:
    from bench.__main__ import BENCH_PLAN  # the bench tenant, not the quota, sets the pace
    from deploy.local.stack import Stack, StackOptions

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, default="torch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--via", choices=VIA, default="canary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        stack = Stack(StackOptions(state_dir=pathlib.Path(state), demo_plan=BENCH_PLAN))
        info = stack.up()
        try:
            figures = run(info, pathlib.Path(state), args.engine, args.rounds, args.via)
        finally:
            stack.down()
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
