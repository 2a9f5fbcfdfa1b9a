"""A peer side by side: LiteLLM's proxy in front of the same engine endpoint as the mesh.

LiteLLM's Triton provider (`model: triton/<Triton model>`, `api_base: …/v2/models/<Triton
model>/generate`) streams from Triton's HTTP `generate_stream` endpoint. The Triton model is the
one serving the reference model's production version: what the mesh routes to and what
`bench/streaming.py` calls directly. One client, one request at a time, sends the same request
in turn to LiteLLM's `/v1/chat/completions`, straight to that endpoint (with the body LiteLLM
sends it) and to the mesh's own OpenAI front (`/v1/completions`), so the difference of TTFT p50s
is what each front adds over HTTP; every answer must be the engine's own, word for word. The
mesh's added TTFT p50 at one stream from the streaming step (gRPC, same run) over LiteLLM's is
`mesh_added_over_litellm_added_ttft_p50_c1` (issue 16: ≤ 0.5); the same over HTTP is
`mesh_http_added_over_litellm_added_ttft_p50_c1`.

LiteLLM lives in its own virtual environment, `.venv-litellm`, made on first use from `LITELLM`
(`bench/tool_venv.py`): its pins would fight the project's. The smoke run does not use it (it
checks our code; LiteLLM is a 0.5 GB peer): it still times the other two endpoints, and reports
LiteLLM's figures as null with the reason under `unmeasured` (`bench/__main__.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import secrets
import ssl
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from bench.streaming import PROMPT, served_triton_model
from bench.tool_venv import tool_executable
from deploy.local.stack import REPO_ROOT, StackInfo
from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

# A release whose `proxy` extra installs from the registry (the newest's needs a package the
# registry lacks: ENVIRONMENT.md). The dev pins' newer `litellm` is the SDK alone, for the client
# tests.
LITELLM = "litellm[proxy]==1.79.3"
LITELLM_VENV = REPO_ROOT / ".venv-litellm"
PROXY_MODEL = "bench-reference"  # the name clients ask LiteLLM for
# LiteLLM renders a chat template into Triton's `text_input`; this one passes the user's text
# through unchanged, so both paths send the engine the same prompt.
PASS_THROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
MAX_TOKENS = 64  # as the streaming step; the answer then takes many times its first token
SAMPLES = 64  # rounds (one request to each endpoint), after the warm-up
WARMUP = 8
BUDGET_S = 120.0  # no new round after this
REQUEST_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0  # LiteLLM imports for ~10-20 s on a busy 2-core machine
STOP_GRACE_S = 10.0


def proxy_config(triton_http: str, triton_model: str, master_key: str) -> dict[str, Any]:
    """LiteLLM's configuration: the Triton model behind one name, every request authenticated
    with the master key (its cheapest auth: virtual keys need a database), nothing sent out."""
    return {
        "model_list": [{
            "model_name": PROXY_MODEL,
            "litellm_params": {
                "model": f"triton/{triton_model}",
                "api_base": f"http://{triton_http}/v2/models/{triton_model}/generate",
            },
        }],
        "litellm_settings": {
            "telemetry": False,
            # LiteLLM takes a Triton model's chat template from the Hub (tokenizer_config.json),
            # and caches it only when the fetch works: offline it would try again, blocking, on
            # every request. Given here, as a deployment that fetched it once would have it.
            "known_tokenizer_config": {triton_model: {
                "status": "success", "tokenizer": {"chat_template": PASS_THROUGH_TEMPLATE}}},
        },
        "general_settings": {"master_key": master_key},
    }


def proxy_env(config_dir: pathlib.Path) -> dict[str, str]:
    """A clean environment (not the bench's: no PYTHONPATH into our tree, no database URL), with
    LiteLLM's price table read from its package instead of downloaded."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return {**env, "TMPDIR": str(config_dir), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@contextlib.contextmanager
def running_proxy(executable: pathlib.Path, triton_http: str, triton_model: str
                  ) -> Iterator[tuple[str, str]]:
    """LiteLLM's proxy on a free loopback port, one worker, its config in a temporary folder;
    yields (base URL, master key) once it answers, and stops it by process id."""
    with tempfile.TemporaryDirectory(prefix="litellm-") as scratch:
        config_dir = pathlib.Path(scratch)
        master_key = "sk-" + secrets.token_urlsafe(24)
        config = config_dir / "config.yaml"
        config.write_text(json.dumps(proxy_config(triton_http, triton_model, master_key)))  # YAML
        port = free_port()
        proxy = ChildProcess(
            "litellm",
            [str(executable), "--config", str(config), "--host", LOOPBACK, "--port", str(port),
             "--num_workers", "1", "--telemetry", "False"],
            config_dir / "litellm.log", env=proxy_env(config_dir), cwd=config_dir)
        base_url = f"http://{LOOPBACK}:{port}"
        proxy.start()
        try:
            wait_ready(proxy, f"{base_url}/health/liveliness")
            yield base_url, master_key
        finally:
            proxy.stop(grace_s=STOP_GRACE_S)


def wait_ready(proxy: ChildProcess, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not proxy.alive():
            raise RuntimeError(f"LiteLLM's proxy exited:\n{proxy.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"LiteLLM's proxy not ready after {START_TIMEOUT_S}s:\n{proxy.log_tail()}")


@dataclass
class Timed:
    """One streamed request: when its first text arrived, when the stream ended, what it said."""

    ttft_s: float = 0.0
    whole_s: float = 0.0
    text: str = ""
    error: str = ""


@dataclass(frozen=True)
class Endpoint:
    """A streaming endpoint in front of the engine and the request the client sends it."""

    url: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    text_of: Callable[[Mapping[str, Any]], str]  # an event's text; ValueError on an error event


def triton_text(event: Mapping[str, Any]) -> str:
    if "error" in event:
        raise ValueError(f"Triton: {event['error']}")
    return event.get("text_output", "")


def openai_text(event: Mapping[str, Any]) -> str:
    """A chat chunk's or a completion chunk's text."""
    if "error" in event:
        raise ValueError(f"{event['error']}")
    choice = (event.get("choices") or [{}])[0]
    return choice.get("delta", {}).get("content") or choice.get("text") or ""


def direct_endpoint(triton_http: str, triton_model: str) -> Endpoint:
    """Triton's own streaming endpoint, with the body LiteLLM's Triton provider sends it."""
    return Endpoint(f"http://{triton_http}/v2/models/{triton_model}/generate_stream",
                    {"text_input": PROMPT, "parameters": {"max_tokens": MAX_TOKENS},
                     "stream": True}, {}, triton_text)


def litellm_endpoint(base_url: str, master_key: str) -> Endpoint:
    return Endpoint(f"{base_url}/v1/chat/completions",
                    {"model": PROXY_MODEL, "messages": [{"role": "user", "content": PROMPT}],
                     "max_tokens": MAX_TOKENS, "stream": True},
                    {"Authorization": f"Bearer {master_key}"}, openai_text)


def mesh_http_endpoint(stack: StackInfo) -> Endpoint:
    """The mesh's OpenAI front; a completion, whose prompt reaches the engine as it is (a chat
    request would be rendered with the model's chat template)."""
    return Endpoint(f"{stack.openai_base_url}/completions",
                    {"model": stack.reference_model, "prompt": PROMPT,
                     "max_tokens": MAX_TOKENS, "stream": True},
                    {"Authorization": f"Bearer {stack.api_key}"}, openai_text)


async def stream_timed(client: httpx.AsyncClient, endpoint: Endpoint) -> Timed:
    """One request, its server-sent events read to the end; TTFT is the first event with text
    (not the response's headers, nor a chunk that only names the role)."""
    timed = Timed()
    parts: list[str] = []
    started = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream("POST", endpoint.url, json=endpoint.body,
                                     headers=endpoint.headers) as response:
                if response.status_code != 200:
                    reply = (await response.aread())[:300]
                    return Timed(error=f"HTTP {response.status_code}: {reply!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line.removeprefix("data:").strip()
                    if payload == "[DONE]":
                        continue
                    if text := endpoint.text_of(json.loads(payload)):
                        if not parts:
                            timed.ttft_s = time.perf_counter() - started
                        parts.append(text)
    except (httpx.HTTPError, TimeoutError, ValueError) as exc:
        return Timed(error=repr(exc))
    timed.whole_s = time.perf_counter() - started
    timed.text = "".join(parts)
    if not parts:
        timed.error = "the stream carried no text"
    return timed


async def interleave(endpoints: Mapping[str, Endpoint], samples: int, warmup: int,
                     budget_s: float, verify: ssl.SSLContext | bool = True
                     ) -> dict[str, list[Timed]]:
    """`warmup` + `samples` rounds of one request to each endpoint, one at a time, the order
    rotating each round. Every answer must be the first endpoint's (the engine's own): the
    same engine work. `verify`: what checks https endpoints (the stack's CA)."""
    names = list(endpoints)
    results: dict[str, list[Timed]] = {name: [] for name in names}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, verify=verify) as client:
        started = time.perf_counter()
        for round_index in range(warmup + samples):
            if time.perf_counter() - started > budget_s:
                break
            turn = round_index % len(names)
            answers = {name: await stream_timed(client, endpoints[name])
                       for name in names[turn:] + names[:turn]}
            for name, timed in answers.items():
                if not timed.error and timed.text != answers[names[0]].text:
                    timed.error = f"{name}'s answer differs from the engine's own"
                if round_index >= warmup:
                    results[name].append(timed)
    return results


def p50_ms(samples: list[Timed], field: str) -> float | None:
    values = [getattr(s, field) * 1000 for s in samples if not s.error]
    return round(statistics.median(values), 2) if values else None


def measure(stack: StackInfo, triton_model: str, proxy: tuple[str, str] | None, samples: int,
            warmup: int, budget_s: float) -> dict[str, Any]:
    """TTFT and whole-answer p50 per endpoint (LiteLLM's when `proxy`), and what each front
    adds to the engine's own TTFT."""
    endpoints = {"triton_http": direct_endpoint(stack.endpoints["triton-http"], triton_model),
                 "mesh_http": mesh_http_endpoint(stack)}
    if proxy is not None:
        endpoints["litellm"] = litellm_endpoint(*proxy)
    ca = stack.client_env().get("INFERMESH_TLS_CA_FILE")
    verify = ssl.create_default_context(cafile=ca) if ca else True
    results = asyncio.run(interleave(endpoints, samples, warmup, budget_s, verify))
    figures: dict[str, Any] = {}
    failed = [timed.error for arm in results.values() for timed in arm if timed.error]
    for error in failed[:3]:
        print(f"litellm peer: a request failed: {error}", file=sys.stderr, flush=True)
    figures["litellm_peer_errors_c1"] = len(failed)
    for name, timed in results.items():
        figures[f"{name}_ttft_p50_ms_c1"] = p50_ms(timed, "ttft_s")
        figures[f"{name}_whole_answer_p50_ms_c1"] = p50_ms(timed, "whole_s")
    for front in ("mesh_http", "litellm"):
        ttft = figures.get(f"{front}_ttft_p50_ms_c1")
        if ttft is not None and figures["triton_http_ttft_p50_ms_c1"] is not None:
            figures[f"{front}_added_ttft_p50_ms_c1"] = round(
                ttft - figures["triton_http_ttft_p50_ms_c1"], 2)
    return figures


def litellm_unmeasured(executable: pathlib.Path | str, figures: Mapping[str, Any]) -> str:
    """Why LiteLLM's added TTFT cannot be given ("" when it can)."""
    ttft = figures.get("litellm_ttft_p50_ms_c1")
    whole = figures.get("litellm_whole_answer_p50_ms_c1")
    if isinstance(executable, str):
        return executable
    if ttft is None or whole is None:
        return "no request through LiteLLM succeeded"
    if ttft > whole / 2:  # the first text came with the whole answer: not a stream
        return f"LiteLLM did not stream (first text at {ttft} ms, the end at {whole} ms)"
    if figures.get("litellm_added_ttft_p50_ms_c1") is None:
        return "no request straight to the engine succeeded"
    return ""


def ratio_or_reason(mesh_added: float | None, litellm_added: float | None
                    ) -> tuple[float | None, str]:
    """The mesh's added TTFT over LiteLLM's, or None and why."""
    if litellm_added is None:
        return None, "LiteLLM's added TTFT is missing"
    if mesh_added is None:
        return None, "the mesh's added TTFT at one stream is missing"
    if litellm_added <= 0:
        return None, f"LiteLLM added {litellm_added} ms: no ratio to take"
    return round(mesh_added / litellm_added, 3), ""


def run(stack: StackInfo, mesh_added_ttft_p50_ms_c1: float | None, samples: int = SAMPLES,
        warmup: int = WARMUP, budget_s: float = BUDGET_S, litellm: bool = True
        ) -> dict[str, Any]:
    """TTFT at one stream through LiteLLM's proxy (when `litellm` and it can be had), through
    the mesh's OpenAI front and straight to the engine, interleaved; LiteLLM's added TTFT beside
    the mesh's (`mesh_added_ttft_p50_ms_c1`, the streaming step's, over gRPC)."""
    triton_model = served_triton_model(stack, stack.reference_model)
    executable = (tool_executable(LITELLM, LITELLM_VENV, "litellm") if litellm
                  else "this run does not use LiteLLM (the smoke checks our code)")
    if isinstance(executable, str):
        print(f"litellm peer: LiteLLM skipped: {executable}", file=sys.stderr, flush=True)
        figures = measure(stack, triton_model, None, samples, warmup, budget_s)
    else:
        with running_proxy(executable, stack.endpoints["triton-http"], triton_model) as proxy:
            figures = measure(stack, triton_model, proxy, samples, warmup, budget_s)
    unmeasured: dict[str, str] = {}
    if why := litellm_unmeasured(executable, figures):
        unmeasured["litellm_added_ttft_p50_ms_c1"] = why
        figures["litellm_added_ttft_p50_ms_c1"] = None
    litellm_added = figures.get("litellm_added_ttft_p50_ms_c1")
    for name, mesh_added in (("mesh_added_over_litellm_added_ttft_p50_c1",
                              mesh_added_ttft_p50_ms_c1),
                             ("mesh_http_added_over_litellm_added_ttft_p50_c1",
                              figures.get("mesh_http_added_ttft_p50_ms_c1"))):
        figures[name], why = ratio_or_reason(mesh_added, litellm_added)
        if why:
            unmeasured[name] = why
    if unmeasured:
        figures["unmeasured"] = unmeasured
    print(f"  c1 added TTFT p50 over the engine: LiteLLM {litellm_added} ms, mesh "
          f"{mesh_added_ttft_p50_ms_c1} ms (gRPC), {figures.get('mesh_http_added_ttft_p50_ms_c1')}"
          f" ms (HTTP) | mesh/LiteLLM {figures['mesh_added_over_litellm_added_ttft_p50_c1']} "
          f"| Triton HTTP ttft p50 {figures['triton_http_ttft_p50_ms_c1']} ms | "
          f"{figures['litellm_peer_errors_c1']} err", flush=True)
    return figures


if __name__ == "__main__":
    from bench.__main__ import BENCH_PLAN
    from bench.streaming import compare
    from deploy.local.stack import Stack, StackOptions

    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as state:
        running = Stack(StackOptions(state_dir=pathlib.Path(state), demo_plan=BENCH_PLAN))
        info = running.up()
        try:
            mesh = compare(info, levels=(1,), max_tokens=MAX_TOKENS, requests_per_stream=1,
                           budget_s=60.0)
            figures = {**mesh, **run(info, mesh["added_ttft_p50_ms_c1"])}
            print(json.dumps(figures, sort_keys=True))
        finally:
            running.down()
