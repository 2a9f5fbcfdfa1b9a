"""The public Inference service as a hostile client meets it (issue 15, classes 4, 7, 8), over
an in-process gRPC server running the real servicer, pipeline, validation and authenticator with
in-memory peers.

- A seeded fuzz of every RPC (well-formed requests with hostile values, random bytes as frames,
  odd metadata): only documented status codes, never UNKNOWN or INTERNAL. The fake engine refuses
  what the torch engine refuses, as INTERNAL: a parameter the gateway let through would show.
- A key revoked while its GenerateStream is open: the stream ends UNAUTHENTICATED within a
  second and no later Start runs; a stream past its maximum age refuses new Starts.
- A tenant pinning a version no open alias names is refused; a grant or an admin key allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import random
import time

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2

from backends.triton.adapter import EngineChunk, EngineRequest
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from services.common import errors
from services.common.auth import Authenticator
from services.common.frames import add_servicer
from services.common.interceptors import ObservabilityInterceptor
from services.common.tenancy import ApiKey, Tenant, TenantPlan, hash_key
from services.gateway.admission import AdmissionLimits, FairAdmission
from services.gateway.idempotency import IdempotencyCache
from services.gateway.openai_http import OpenAIFront
from services.gateway.peers import Grant, Route
from services.gateway.pipeline import GenerationPipeline
from services.gateway.server import Generations, InferenceServicer
from services.gateway.settings import GatewaySettings
from services.gateway.shadow import ShadowTraffic
from services.gateway.validation import Limits
from services.registry.catalog import ModelCatalog
from services.registry.manifest import version_id
from services.registry.rollout import Routing
from tests.fakes import whitespace_tokenizers

DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
REFERENCE = {
    "name": "demo", "description": "production", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 64},
    "sampling": {"max_tokens": 4, "temperature": 0.7, "top_p": 0.95, "top_k": 0},
}
WITHDRAWN = dict(copy.deepcopy(REFERENCE), description="withdrawn for unsafe output")
TORCH = dict(copy.deepcopy(REFERENCE), name="tiny",
             engine={"kind": "torch", "context_window": 4096, "max_output_tokens": 64})
USER_KEY, ADMIN_KEY, OTHER_KEY = "imk_user", "imk_admin", "imk_other"
CALLS_PER_RPC = 300


class Table:
    """Stands in for a WatchCache: what the authenticator reads."""

    def __init__(self, items: dict) -> None:
        self.items = items

    def get(self, key):
        return self.items.get(key)


class Admission:
    async def acquire_slot(self, tenant, request_id, input_tokens, output_tokens):
        return Grant(slot_id=request_id, max_tokens=output_tokens)

    async def release_slot(self, tenant, slot_id, input_used, output_used):
        return None


class Routes:
    async def route(self, triton_model_name, version_id, request_id, hold_s, exclude, *,
                    prefix_hashes=(), prompt_tokens=0, kv_blocks=((), 0)):
        return Route("replica-0", triton_model_name, f"res-{request_id}")

    async def release_route(self, reservation_id, outcome=None, completion_tokens=0):
        return None


class StrictEngine:
    """Refuses what the torch engine refuses, as the adapter relays it (INTERNAL); tokens come
    every `delay_s` so a stream can be caught in flight."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.started: list[str] = []

    async def generate(self, endpoint: str, request: EngineRequest):
        if endpoint.startswith("tiny-") and request.bad_words:
            raise errors.Internal("the torch engine does not support bad_words")
        self.started.append(request.request_id)
        for count in range(1, request.max_tokens + 1):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield EngineChunk("w ", 2, count, count == request.max_tokens)


class Audit:
    def emit(self, event) -> None:
        return None


@dataclasses.dataclass
class Gateway:
    stub: inference_pb2_grpc.InferenceStub
    channel: grpc.aio.Channel
    keys: Table
    tenants: Table
    engine: StrictEngine
    withdrawn: str
    http: OpenAIFront


@contextlib.asynccontextmanager
async def gateway(delay_s: float = 0.0, **settings):
    catalog = ModelCatalog()
    production, withdrawn, tiny = (version_id(m) for m in (REFERENCE, WITHDRAWN, TORCH))
    catalog.rebuild({
        f"demo/versions/{production}": {"version_id": production, "manifest": REFERENCE},
        f"demo/versions/{withdrawn}": {"version_id": withdrawn, "manifest": WITHDRAWN},
        "demo/routing": Routing(revision=1, production=production).to_record(),
        f"tiny/versions/{tiny}": {"version_id": tiny, "manifest": TORCH},
        "tiny/routing": Routing(revision=1, production=tiny).to_record(),
    })
    keys = Table({hash_key(USER_KEY): ApiKey("k-user", "acme", "user"),
                  hash_key(ADMIN_KEY): ApiKey("k-admin", "ops", "admin"),
                  hash_key(OTHER_KEY): ApiKey("k-other", "narrow", "user")})
    tenants = Table({"acme": Tenant("acme", "acme"), "ops": Tenant("ops", "ops"),
                     "narrow": Tenant("narrow", "narrow", TenantPlan(models=("tiny",)))})
    engine = StrictEngine(delay_s)
    routes = Routes()
    pipeline = GenerationPipeline(
        catalog, Admission(), routes, engine, Audit(), Limits(max_timeout_s=600.0),
        FairAdmission(AdmissionLimits()),
        shadow=ShadowTraffic(routes, engine, max_in_flight=0, timeout_s=1.0),
        tokenizers=whitespace_tokenizers(), source="gateway/test")
    authenticator = Authenticator(keys, tenants)  # type: ignore[arg-type]
    generations = Generations(pipeline, IdempotencyCache())
    http = OpenAIFront(authenticator, catalog, generations, asyncio.Event(), 15.0, 64,
                       max_body_bytes=64 << 10)
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor()])  # as the gateway's
    add_servicer(server, InferenceServicer(
        authenticator, catalog, generations,
        GatewaySettings(**settings), asyncio.Event()),
        inference_pb2.DESCRIPTOR.services_by_name["Inference"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Gateway(inference_pb2_grpc.InferenceStub(channel), channel, keys, tenants,
                          engine, withdrawn, http)
    finally:
        await server.stop(0)
        await pipeline.drain_background()


def auth(key: str):
    return (("authorization", f"Bearer {key}"),)


# -- the fuzz ----------------------------------------------------------------------------------

def _text(rng: random.Random) -> str:
    return rng.choice([
        "", "hi", "demo", "tiny", "demo@production", "demo@shadow", "demo@previous",
        "tiny@sha256:" + "0" * 64, "x" * rng.choice([1, 129, 257, 5000]),
        "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(1, 40)))
        .encode("utf-8", "ignore").decode("utf-8", "ignore"),
        "word " * rng.randrange(1, 400),
    ])


def _sampling(rng: random.Random) -> inference_pb2.SamplingParams:
    params = inference_pb2.SamplingParams()
    choices = {
        "max_tokens": lambda: rng.choice([0, 1, 4, 64, 65, 2**31 - 1, -1]),
        "temperature": lambda: rng.choice([0.0, 0.7, 2.5, -1.0, float("nan"), float("inf")]),
        "top_p": lambda: rng.choice([0.0, 0.5, 1.0, 1.5, float("nan")]),
        "top_k": lambda: rng.choice([0, 5, 1001, -3]),
        "seed": lambda: rng.choice([0, 7, 2**64 - 1]),
        "repetition_penalty": lambda: rng.choice([1.0, 1.2, 0.0, 3.0, float("nan")]),
        "presence_penalty": lambda: rng.choice([0.0, 0.5, -2.5, float("inf")]),
        "frequency_penalty": lambda: rng.choice([0.0, 0.5, 9.0]),
        "min_tokens": lambda: rng.choice([0, 2, 100, -1]),
    }
    for name, value in choices.items():
        if rng.random() < 0.3:
            with contextlib.suppress(ValueError, TypeError):
                setattr(params, name, value())
    if rng.random() < 0.2:
        params.stop.extend(_text(rng) for _ in range(rng.randrange(0, 6)))
    if rng.random() < 0.2:
        params.bad_words.extend(_text(rng) for _ in range(rng.randrange(0, 3)))
    return params


def _request(rng: random.Random) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=rng.choice(["demo", "tiny", "demo@production", "nope"]) if rng.random() < 0.7
        else _text(rng),
        params=_sampling(rng))
    if rng.random() < 0.8:
        request.prompt = _text(rng) if rng.random() < 0.5 else "say something"
    else:
        for _ in range(rng.randrange(0, 4)):
            request.messages.messages.add(role=rng.choice(["user", "system", "root", ""]),
                                          content=_text(rng))
    for name in ("request_id", "idempotency_key", "user"):
        if rng.random() < 0.2:
            setattr(request, name, _text(rng))
    if rng.random() < 0.2:
        request.priority = rng.choice([0, 3, 4, -1, 2**31 - 1])
    if rng.random() < 0.3:
        request.timeout.CopyFrom(duration_pb2.Duration(
            seconds=rng.choice([0, 1, 10**9, -(2**63), 2**63 - 1, 315_576_000_000]),
            nanos=rng.choice([0, 5, -5, 999_999_999, 2**31 - 1, -(2**31)])))
    return request


def _metadata(rng: random.Random):
    return rng.choice([
        auth(USER_KEY), auth(USER_KEY), auth(ADMIN_KEY), auth(OTHER_KEY), (),
        (("authorization", "Basic abc"),), (("authorization", "Bearer "),),
        (("authorization", "Bearer " + "k" * 5000),),
        (*auth(USER_KEY), ("x-request-id", "x" * 300)),
        (*auth(USER_KEY), ("weird-bin", bytes(rng.randrange(256) for _ in range(20)))),
    ])


def _junk(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_fuzzing_every_inference_rpc_yields_only_documented_codes():
    rng = random.Random(15)
    seen: dict[str, set[str]] = {}
    async with gateway() as gw:
        raw = {name: gw.channel.unary_unary(f"/infermesh.v1.Inference/{name}")
               for name in ("Generate", "ListModels", "GetModel")}
        raw_stream = gw.channel.stream_stream("/infermesh.v1.Inference/GenerateStream")

        async def check(rpc: str, code: grpc.StatusCode, what) -> None:
            assert code in DOCUMENTED, f"{rpc} answered {code} to {what!r:.300}"
            seen.setdefault(rpc, set()).add(code.name)

        for _ in range(CALLS_PER_RPC):
            request, metadata = _request(rng), _metadata(rng)
            if rng.random() < 0.15:
                junk = _junk(rng)
                await check("Generate", await _code(raw["Generate"](junk, metadata=metadata,
                                                                    timeout=10)), junk)
            else:
                await check("Generate", await _code(gw.stub.Generate(
                    request, metadata=metadata, timeout=10)), request)
            name = rng.choice(["demo", "tiny", "", _text(rng)])
            if rng.random() < 0.15:
                await check("GetModel", await _code(raw["GetModel"](_junk(rng), timeout=10,
                                                                    metadata=metadata)), name)
            else:
                await check("GetModel", await _code(gw.stub.GetModel(
                    inference_pb2.GetModelRequest(name=name), metadata=metadata, timeout=10)),
                    name)
            list_call = (raw["ListModels"](_junk(rng), metadata=metadata, timeout=10)
                         if rng.random() < 0.15 else
                         gw.stub.ListModels(inference_pb2.ListModelsRequest(),
                                            metadata=metadata, timeout=10))
            await check("ListModels", await _code(list_call), metadata)

        for _ in range(CALLS_PER_RPC // 3):  # each stream carries about three frames
            metadata = _metadata(rng)
            frames: list[bytes] = []
            for _ in range(rng.randrange(1, 5)):
                kind = rng.random()
                if kind < 0.6:
                    frames.append(inference_pb2.ClientFrame(start=_request(rng))
                                  .SerializeToString())
                elif kind < 0.75:
                    frames.append(inference_pb2.ClientFrame(cancel=inference_pb2.Cancel(
                        request_id=_text(rng))).SerializeToString())
                else:
                    frames.append(_junk(rng))
            call = raw_stream(iter(frames), metadata=metadata, timeout=10)
            try:
                async for reply in call:
                    frame = inference_pb2.ServerFrame.FromString(reply)
                    if frame.HasField("final") and frame.final.HasField("error"):
                        code = grpc.StatusCode[frame.final.error.code]
                        await check("GenerateStream.final", code, frames)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            await check("GenerateStream", code, frames)
    # The fuzz reached past the cheap refusals: generations ran, and each refusal kind showed.
    assert {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED"} <= seen["Generate"]
    assert "PERMISSION_DENIED" in seen["Generate"] | seen["GenerateStream.final"]
    assert {"OK", "INVALID_ARGUMENT"} <= seen["GenerateStream"]


async def test_unsupported_parameters_and_a_huge_timeout_name_the_field():
    async with gateway() as gw:
        for model, params, field in (
            ("tiny", inference_pb2.SamplingParams(bad_words=["x"]), "bad_words"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await gw.stub.Generate(inference_pb2.GenerateRequest(
                    model=model, prompt="hi", params=params), metadata=auth(USER_KEY), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"params.{field}" in raised.value.details()
            assert "torch" in raised.value.details()
        # The reference engine takes them; a neutral value is fine on torch, and penalties too.
        await gw.stub.Generate(inference_pb2.GenerateRequest(
            model="demo", prompt="hi", params=inference_pb2.SamplingParams(
                bad_words=["x"], max_tokens=1)), metadata=auth(USER_KEY), timeout=10)
        await gw.stub.Generate(inference_pb2.GenerateRequest(
            model="tiny", prompt="hi", params=inference_pb2.SamplingParams(
                presence_penalty=0.5, logit_bias={3: -100.0}, max_tokens=1)),
            metadata=auth(USER_KEY), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gw.stub.Generate(inference_pb2.GenerateRequest(
                model="demo", prompt="hi", timeout=duration_pb2.Duration(seconds=2**63 - 1)),
                metadata=auth(USER_KEY))  # no gRPC deadline: the field alone decides
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("timeout")


# -- class 7: model access ---------------------------------------------------------------------

async def test_pinning_a_withdrawn_version_needs_a_grant_or_an_admin_key():
    async with gateway() as gw:
        pinned = inference_pb2.GenerateRequest(
            model=f"demo@{gw.withdrawn}", prompt="hi",
            params=inference_pb2.SamplingParams(max_tokens=1))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gw.stub.Generate(pinned, metadata=auth(USER_KEY), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--version-grants" in raised.value.details()
        assert gw.engine.started == []  # refused before routing: nothing was placed or loaded
        await gw.stub.Generate(pinned, metadata=auth(ADMIN_KEY), timeout=10)
        gw.tenants.items["acme"] = Tenant("acme", "acme", TenantPlan(
            version_grants=(gw.withdrawn,)))
        await gw.stub.Generate(pinned, metadata=auth(USER_KEY), timeout=10)
        await gw.stub.Generate(inference_pb2.GenerateRequest(
            model="demo@production", prompt="hi",
            params=inference_pb2.SamplingParams(max_tokens=1)), metadata=auth(USER_KEY),
            timeout=10)
        # A plan listing models: others are refused, and not listed.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gw.stub.Generate(inference_pb2.GenerateRequest(model="demo", prompt="hi"),
                                   metadata=auth(OTHER_KEY), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await gw.stub.ListModels(inference_pb2.ListModelsRequest(),
                                          metadata=auth(OTHER_KEY), timeout=10)
        assert [m.name for m in listed.models] == ["tiny"]


# -- class 4: keys checked while a stream is open ----------------------------------------------

def _start(request_id: str, max_tokens: int = 2) -> inference_pb2.ClientFrame:
    return inference_pb2.ClientFrame(start=inference_pb2.GenerateRequest(
        request_id=request_id, model="demo", prompt="hi",
        params=inference_pb2.SamplingParams(max_tokens=max_tokens)))


async def test_a_key_revoked_mid_stream_ends_it_within_a_second():
    async with gateway(delay_s=0.05, reauth_interval_s=0.2) as gw:
        outbox: asyncio.Queue = asyncio.Queue()

        async def frames():
            while (frame := await outbox.get()) is not None:
                yield frame

        call = gw.stub.GenerateStream(frames(), metadata=auth(USER_KEY), timeout=30)
        await outbox.put(_start("before", max_tokens=1))
        async for frame in call:
            if frame.HasField("final"):
                assert frame.final.request_id == "before" and not frame.final.HasField("error")
                break
        await outbox.put(_start("in-flight", max_tokens=60))  # ~3 s of tokens
        async for frame in call:
            if frame.HasField("tokens"):
                break
        del gw.keys.items[hash_key(USER_KEY)]  # revoked: the watch drops it
        revoked = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for frame in call:
                assert not frame.HasField("final") or frame.final.request_id == "in-flight"
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - revoked < 1.0
        await outbox.put(None)
        assert gw.engine.started == ["before", "in-flight"]


async def test_a_lowered_plan_applies_to_the_next_start_and_old_streams_stop_taking_starts():
    async with gateway(delay_s=0.05, max_stream_age_s=0.4) as gw:
        outbox: asyncio.Queue = asyncio.Queue()

        async def frames():
            while (frame := await outbox.get()) is not None:
                yield frame

        call = gw.stub.GenerateStream(frames(), metadata=auth(USER_KEY), timeout=30)
        await outbox.put(_start("long", max_tokens=16))  # ~0.8 s, past the stream's max age
        async for frame in call:
            if frame.HasField("accepted"):
                break
        gw.tenants.items["acme"] = Tenant("acme", "acme", TenantPlan(max_output_tokens=1,
                                                                     max_context_tokens=1))
        await outbox.put(_start("over-plan", max_tokens=2))
        finals = []
        async for frame in call:
            if frame.HasField("final"):
                finals.append(frame.final)
                if frame.final.request_id == "over-plan":
                    await asyncio.sleep(0.5)
                    await outbox.put(_start("too-late", max_tokens=1))
        # The one in flight kept its plan and finished; the stream then ended by itself.
        assert [(f.request_id, f.error.code, f.error.field) for f in finals] == [
            ("over-plan", "INVALID_ARGUMENT", "params.max_tokens"),
            ("too-late", "UNAVAILABLE", ""),
            ("long", "", "")]
        assert "open a new one" in finals[1].error.message
        await outbox.put(None)


# -- class 3 and 8 over HTTP -------------------------------------------------------------------

async def test_http_body_over_the_limit_is_413_and_unsupported_parameters_are_400():
    async with gateway() as gw:
        transport = httpx.ASGITransport(app=gw.http.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            headers = {"authorization": f"Bearer {USER_KEY}"}
            body = {"model": "demo", "prompt": "x" * (65 << 10)}
            declared = await client.post("/v1/completions", json=body, headers=headers)
            assert declared.status_code == 413
            assert declared.json()["error"]["code"] == "request_too_large"

            async def chunks():  # no Content-Length: refused while reading, not after
                for _ in range(1000):
                    yield b" " * 4096

            streamed = await client.post("/v1/completions", content=chunks(), headers=headers)
            assert streamed.status_code == 413
            nested = await client.post("/v1/completions", content=b"[" * 60_000,
                                       headers=headers)
            assert nested.status_code == 400
            refused = await client.post("/v1/chat/completions", headers=headers, json={
                "model": "tiny", "logit_bias": {"1": 200},
                "messages": [{"role": "user", "content": "hi"}]})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "logit_bias"
            served = await client.post("/v1/completions", headers=headers, json={
                "model": "demo", "prompt": "hi", "max_tokens": 1, "presence_penalty": 0.5})
            assert served.status_code == 200, served.text
