"""The reference engine inside a real Triton (the nvidia-pytriton binary), over gRPC streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferResult, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from backends.triton.adapter import EngineRequest, TritonAdapter, build_request, engine_failure
from backends.triton.launcher import TritonPorts, TritonServer, stub_pids
from backends.triton.reference_engine import GenerationRequest, complete, count_tokens
from deploy.local.replicas import reference_repository

pytestmark = pytest.mark.integration

MODEL = "reference"
PROMPT = "Describe a quiet morning by the sea."
SHM = pathlib.Path("/dev/shm")


def stub_regions(workdir: pathlib.Path) -> set[str]:
    """The shared-memory regions this server's stubs use (each stub gets its name on argv)."""
    regions: set[str] = set()
    for pid in stub_pids(workdir):
        args = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        regions.update(a for a in args if a.startswith("triton_python_backend_shm_region_"))
    assert regions, "a running stub names its region"
    return regions


def left_in_shm(regions: set[str]) -> set[str]:
    # Compared by name: other Triton servers on this machine may come and go meanwhile.
    return {name for name in regions if (SHM / name).exists()}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """One Triton with the reference model for this module; its stop must be clean and leak-free."""
    server = TritonServer(tmp_path_factory.mktemp("triton"), TritonPorts.free())
    server.start()
    server.wait_ready()
    regions = stub_regions(server.workdir)
    yield server
    # A clean SIGTERM exit (0) proves the model unloaded: no stream was left half-open (Trap 4).
    assert server.stop() == 0, server.log_tail()
    assert stub_pids(server.workdir) == []
    assert left_in_shm(regions) == set()


@pytest.fixture
async def client(triton: TritonServer) -> AsyncIterator[triton_aio.InferenceServerClient]:
    async with triton_aio.InferenceServerClient(triton.grpc_address) as grpc_client:
        yield grpc_client


def tensor(name: str, value: np.ndarray, datatype: str) -> InferInput:
    item = InferInput(name, list(value.shape), datatype)
    item.set_data_from_numpy(value)
    return item


def engine_inputs(
    max_tokens: int = 200,
    stream: bool = True,
    seed: int = 0,
    min_tokens: int | None = None,
    exclude_input_in_output: bool | None = None,
    stop_words: Sequence[str] = (),
    prompt: str = PROMPT,
) -> list[InferInput]:
    """The TensorRT-LLM `ensemble` inputs for one request (batch dimension 1)."""
    inputs = [
        tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        tensor("stream", np.array([[stream]], dtype=bool), "BOOL"),
        tensor("seed", np.array([[seed]], dtype=np.uint64), "UINT64"),
    ]
    if min_tokens is not None:
        inputs.append(tensor("min_tokens", np.array([[min_tokens]], dtype=np.int32), "INT32"))
    if exclude_input_in_output is not None:
        flag = np.array([[exclude_input_in_output]], dtype=bool)
        inputs.append(tensor("exclude_input_in_output", flag, "BOOL"))
    if stop_words:
        words = np.array([[w.encode() for w in stop_words]], dtype=np.object_)
        inputs.append(tensor("stop_words", words, "BYTES"))
    return inputs


async def one_request(inputs: list[InferInput]) -> AsyncIterator[dict[str, object]]:
    """Sends one request, then half-closes: the server ends the stream after its final response."""
    yield {"model_name": MODEL, "inputs": inputs}


async def generate(
    client: triton_aio.InferenceServerClient, inputs: list[InferInput]
) -> list[InferResult]:
    """Every response of one request; raises its error only once the server ended the stream.

    Reading to the end matters: a client that drops a stream right after the final response can
    leave Triton unable to unload the model (ENVIRONMENT.md, Trap 4).
    """
    results, errors = [], []
    async for result, error in client.stream_infer(one_request(inputs)):
        if error is not None:
            errors.append(error)
        else:
            results.append(result)
    if errors:
        raise errors[0]
    return results


def text(result: InferResult) -> str:
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def scalar(result: InferResult, name: str) -> int:
    return int(result.as_numpy(name).reshape(-1)[0])


def is_final(result: InferResult) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def read_metrics(server: TritonServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        return response.read().decode()


def metric(metrics_text: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels`."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in metrics_text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and wanted <= set(match.group(1).split(",")):
            return float(match.group(2))
    raise LookupError(f"no sample {name}{labels}")


async def test_streamed_deltas_concatenate_to_the_non_streamed_text(
    client: triton_aio.InferenceServerClient,
) -> None:
    streamed = await generate(client, engine_inputs(seed=11, stream=True))
    whole = await generate(
        client, engine_inputs(seed=11, stream=False, exclude_input_in_output=True)
    )
    expected = complete(GenerationRequest(0, PROMPT, max_tokens=200, seed=11))

    deltas = [text(r) for r in streamed]
    assert len(whole) == 1 and is_final(whole[0])
    assert "".join(deltas) == text(whole[0]) == expected.text
    assert [is_final(r) for r in streamed] == [False] * (len(streamed) - 1) + [True]
    assert all(count_tokens(d) == 1 for d in deltas)
    last = streamed[-1]
    assert scalar(last, "num_output_tokens") == len(deltas) == expected.num_output_tokens
    assert scalar(whole[0], "num_output_tokens") == expected.num_output_tokens
    assert scalar(last, "num_input_tokens") == count_tokens(PROMPT)
    assert [scalar(r, "num_output_tokens") for r in streamed] == list(range(1, len(deltas) + 1))
    first_token_ns = scalar(streamed[0], "first_token_time_ns")
    assert abs(time.time_ns() - first_token_ns) < 60e9
    assert all(scalar(r, "first_token_time_ns") == first_token_ns for r in streamed)


async def test_non_streamed_text_repeats_the_prompt_unless_excluded(
    client: triton_aio.InferenceServerClient,
) -> None:
    [result] = await generate(client, engine_inputs(max_tokens=8, stream=False, seed=3))
    expected = complete(GenerationRequest(0, PROMPT, max_tokens=8, seed=3))
    assert text(result) == PROMPT + expected.text
    assert scalar(result, "num_output_tokens") == 8


async def test_stop_words_end_the_text_before_them(
    client: triton_aio.InferenceServerClient,
) -> None:
    natural = complete(GenerationRequest(0, PROMPT, max_tokens=200, seed=5)).text
    stop = " ".join(natural.split()[6:8])
    streamed = await generate(client, engine_inputs(seed=5, stop_words=["", stop]))
    assert "".join(text(r) for r in streamed) == natural[: natural.index(stop)]
    assert is_final(streamed[-1])


async def test_concurrent_requests_share_steps_and_each_get_their_own_text(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    seeds = range(20, 26)
    results = await asyncio.gather(*(generate(client, engine_inputs(seed=s)) for s in seeds))
    for seed, streamed in zip(seeds, results, strict=True):
        expected = complete(GenerationRequest(0, PROMPT, max_tokens=200, seed=seed))
        assert "".join(text(r) for r in streamed) == expected.text
        assert is_final(streamed[-1])
    metrics = await asyncio.to_thread(read_metrics, triton)
    assert metric(metrics, "nv_trt_llm_request_metrics", request_type="active") == 0
    assert metric(metrics, "nv_trt_llm_request_metrics", request_type="max") == 32


async def test_kv_cache_metrics_and_prefix_hits_on_the_metrics_endpoint(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    def kv(metrics_text: str, kind: str) -> float:
        return metric(metrics_text, "nv_trt_llm_kv_cache_block_metrics", model=MODEL,
                      version="1", kv_cache_block_type=kind)

    def prefilled(metrics_text: str, cache: str) -> float:
        return metric(metrics_text, "infermesh_engine_prefill_tokens_total", model=MODEL,
                      cache=cache)

    before = await asyncio.to_thread(read_metrics, triton)
    # 130 words unseen by the other tests, in blocks of 64 (config.pbtxt): two full blocks.
    system_prompt = " ".join(f"rule{i}" for i in range(130))
    first = await generate(client, engine_inputs(max_tokens=2, prompt=system_prompt))
    after_first = await asyncio.to_thread(read_metrics, triton)
    second = await generate(client, engine_inputs(max_tokens=2, prompt=system_prompt))
    after_second = await asyncio.to_thread(read_metrics, triton)

    assert scalar(first[-1], "kv_cache_reused_blocks") == 0
    assert scalar(second[-1], "kv_cache_reused_blocks") == 2
    assert scalar(second[-1], "num_input_tokens") == 130
    # The first computed all 130 prompt tokens; the second found 128 cached and computed 2.
    assert prefilled(after_first, "miss") == prefilled(before, "miss") + 130
    assert prefilled(after_second, "miss") == prefilled(after_first, "miss") + 2
    assert prefilled(after_second, "hit") == prefilled(before, "hit") + 128
    for metrics in (after_first, after_second):  # idle again: every block free, two more cached
        assert (kv(metrics, "max"), kv(metrics, "tokens_per")) == (4096, 64)
        assert (kv(metrics, "used"), kv(metrics, "free"), kv(metrics, "fraction")) == (0, 4096, 0)
        assert kv(metrics, "reused") == kv(before, "reused") + 2
        assert metric(metrics, "nv_trt_llm_request_metrics", request_type="waiting") == 0


async def test_a_cache_salt_keeps_tenants_prefix_cache_entries_apart(
    triton: TritonServer,
) -> None:
    """Issue 15, class 9: the gateway's adapter sends an isolated tenant's `cache_salt`; only
    requests with the same salt reuse each other's cached blocks (and skip their prefill)."""
    system_prompt = " ".join(f"salted{i}" for i in range(130))  # two full blocks of 64

    async def reused(salt: str) -> int:
        request = build_request(EngineRequest(MODEL, "r", system_prompt, max_tokens=2,
                                              cache_salt=salt))
        request.outputs.add(name="kv_cache_reused_blocks")  # beside what the gateway reads
        async with grpc.aio.insecure_channel(triton.grpc_address) as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([request]))
            responses = [response async for response in call]  # to the stream's end (Trap 4)
        assert [r.error_message for r in responses if r.error_message] == []
        return scalar(InferResult(responses[-1].infer_response), "kv_cache_reused_blocks")

    assert await reused("tenant-a") == 0
    assert await reused("tenant-b") == 0  # the same prompt, another tenant: no hit
    assert await reused("") == 0  # nor for the tenants that share
    assert await reused("tenant-a") == 2
    assert await reused("") == 2


async def test_bad_input_gets_an_error_response_and_the_stream_ends(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    async def errors() -> float:
        metrics = await asyncio.to_thread(read_metrics, triton)
        return metric(metrics, "infermesh_engine_requests_total", outcome="error")

    before = await errors()
    with pytest.raises(InferenceServerException, match="max_tokens must be at least 1"):
        await generate(client, engine_inputs(max_tokens=0))
    assert await errors() == before + 1


async def test_cancelled_request_stops_generating(
    client: triton_aio.InferenceServerClient, triton: TritonServer
) -> None:
    def cancelled(metrics_text: str) -> float:
        return metric(metrics_text, "infermesh_engine_requests_total", outcome="cancelled")

    cancelled_before = cancelled(await asyncio.to_thread(read_metrics, triton))
    endless = engine_inputs(max_tokens=1_000_000, min_tokens=1_000_000, seed=9)
    responses = client.stream_infer(one_request(endless))
    received = 0
    async for result, error in responses:
        assert error is None and not is_final(result)
        received += 1
        if received == 5:
            running = await asyncio.to_thread(read_metrics, triton)
            assert metric(running, "nv_trt_llm_kv_cache_block_metrics",
                          kv_cache_block_type="used") >= 1
            responses.cancel()
            break

    deadline = time.monotonic() + 10
    while True:
        metrics = await asyncio.to_thread(read_metrics, triton)
        active = metric(metrics, "nv_trt_llm_request_metrics", request_type="active")
        if cancelled(metrics) == cancelled_before + 1 and active == 0:
            break
        assert time.monotonic() < deadline, metrics
        await asyncio.sleep(0.05)
    assert metric(metrics, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="used") == 0
    tokens = metric(metrics, "infermesh_engine_generated_tokens_total", model=MODEL)
    await asyncio.sleep(0.3)  # ~70 decode steps' worth of time
    later = await asyncio.to_thread(read_metrics, triton)
    assert metric(later, "infermesh_engine_generated_tokens_total", model=MODEL) == tokens
    assert cancelled(later) == cancelled_before + 1


async def test_the_kv_pool_set_in_config_bounds_what_runs_together(tmp_path: pathlib.Path) -> None:
    # Three blocks of four tokens: one request of 7 prompt + 4 output tokens fills the pool.
    repository = reference_repository(tmp_path / "models", [MODEL],
                                      {"kv_cache_blocks": "3", "kv_block_tokens": "4"})
    server = TritonServer(tmp_path / "triton", TritonPorts.free(), repository)
    server.start()
    try:
        await asyncio.to_thread(server.wait_ready)
        prompt = "one two three four five six seven"
        async with triton_aio.InferenceServerClient(server.grpc_address) as small:
            first, second = await asyncio.gather(*(
                generate(small, engine_inputs(max_tokens=4, min_tokens=4, seed=seed,
                                              prompt=prompt)) for seed in (1, 2)))
            with pytest.raises(InferenceServerException, match="kv_cache_blocks=3") as refusal:
                await generate(small, engine_inputs(max_tokens=1, prompt=" ".join(["w"] * 12)))
            # Worded as a refusal, which the gateway answers INVALID_ARGUMENT (adapter).
            assert engine_failure(server.grpc_address, refusal.value.message()).code == (
                "INVALID_ARGUMENT")
        for seed, streamed in ((1, first), (2, second)):
            expected = complete(GenerationRequest(0, prompt, max_tokens=4, seed=seed))
            assert "".join(text(r) for r in streamed) == expected.text
        # Not prefilled in the same step (which would stamp both first tokens alike): one waited.
        assert scalar(first[0], "first_token_time_ns") != scalar(second[0], "first_token_time_ns")
        metrics = await asyncio.to_thread(read_metrics, server)
        kv = {kind: metric(metrics, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type=kind)
              for kind in ("max", "tokens_per", "used", "free")}
        assert kv == {"max": 3, "tokens_per": 4, "used": 0, "free": 3}
    finally:
        assert await asyncio.to_thread(server.stop) == 0, server.log_tail()


def test_stop_cleans_up_stubs_and_shared_memory_after_triton_is_killed(
    tmp_path: pathlib.Path,
) -> None:
    server = TritonServer(tmp_path, TritonPorts.free())
    server.start()
    try:
        server.wait_ready()
        regions = stub_regions(tmp_path)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)  # what a crash looks like: stubs and regions stay
        deadline = time.monotonic() + 5
        while server.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub_pids(tmp_path) and left_in_shm(regions) == regions
    finally:
        assert server.stop() == -signal.SIGKILL
    assert stub_pids(tmp_path) == []
    assert left_in_shm(regions) == set()


def http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def test_launcher_cli_runs_triton_until_sigterm_and_exits_cleanly(tmp_path: pathlib.Path) -> None:
    ports = TritonPorts.free()
    launcher = subprocess.Popen(
        [
            sys.executable, "-m", "backends.triton.launcher",
            "--grpc-port", str(ports.grpc),
            "--http-port", str(ports.http),
            "--metrics-port", str(ports.metrics),
            "--workdir", str(tmp_path),
            "--load-model", MODEL,
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not http_ready(ports.http):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        regions = stub_regions(tmp_path)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert stub_pids(tmp_path) == []
    assert left_in_shm(regions) == set()
    assert "successfully unloaded 'reference'" in (tmp_path / "tritonserver.log").read_text()


async def test_a_continuation_from_the_output_ids_goes_on_where_the_stream_was_cut(
    triton: TritonServer,
) -> None:
    """Through the gateway's adapter: each chunk's `output_ids` are the tokens of its text; a
    request with `continue_ids` (what a cut stream had delivered) and the max_tokens left sends
    the rest, the same as the uncut stream's, and counts only the new tokens."""
    adapter = TritonAdapter(None)
    original = EngineRequest(MODEL, "whole", PROMPT, max_tokens=40, seed=13, stop=("the ri",),
                             return_output_ids=True)
    try:
        whole = [c async for c in adapter.generate(triton.grpc_address, original)]
        ids = [token for chunk in whole for token in chunk.token_ids]
        assert len(ids) == whole[-1].completion_tokens
        cut = len(whole) // 2
        delivered = [token for chunk in whole[:cut] for token in chunk.token_ids]
        continuation = dataclasses.replace(
            original, request_id="rest", continue_ids=tuple(delivered),
            max_tokens=original.max_tokens - len(delivered))
        rest = [c async for c in adapter.generate(triton.grpc_address, continuation)]
    finally:
        await adapter.close()
    assert "".join(c.text for c in whole[:cut] + rest) == "".join(c.text for c in whole)
    assert [t for c in rest for t in c.token_ids] == ids[len(delivered):]
    assert rest[-1].completion_tokens == len(ids) - len(delivered)
    assert rest[-1].prompt_tokens == count_tokens(PROMPT) + len(delivered)
