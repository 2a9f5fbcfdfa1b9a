"""The stack's real Prometheus: every process scraped and up, every rule loaded and healthy, every
metric a rule or dashboard reads actually exported, and `meshctl slo` reading it back."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from deploy.local.stack import StackInfo
from deploy.monitoring.rules import RATIO
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from meshctl.__main__ import app
from services.common import slo

MONITORING = pathlib.Path(slo.DEFAULT_SLO_CONFIG).parent
JOBS = {"registry", "ratelimit", "scheduler", "auditor", "gateway", "sidecar", "triton", "etcd",
        "prometheus"}
# A raw metric a query reads (recording rules have colons, so they never match).
RAW_METRIC = re.compile(r"(?<![\w:])(?:infermesh|nv|etcd)_[a-z0-9_]+(?![\w:])|(?<![\w:])up(?=[{ ])")
RECORDED = re.compile(r"(?<![\w:])infermesh:[a-z0-9_:]+")


def api(stack: StackInfo, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    url = f"http://{stack.endpoints['prometheus']}/api/v1/{path}{query}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def wait_for(condition, what: str, timeout_s: float = 45.0):
    """Polls `condition` (returns a truthy result or None) until it holds; fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(1.0)


def declared_metrics(stack: StackInfo) -> set[str]:
    """Names every target declares (`# TYPE`), with a histogram's series: a labelled counter that
    has not counted yet (no drops, no refusals) is exported all the same."""
    names: set[str] = set()
    for target in api(stack, "targets")["activeTargets"]:
        with urllib.request.urlopen(target["scrapeUrl"], timeout=5) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
                names.update(name + suffix for suffix in suffixes)
    return names


def rule_expressions() -> list[str]:
    return [
        rule["expr"]
        for path in sorted((MONITORING / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def dashboard_expressions() -> list[str]:
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        walk(json.loads(path.read_text()))
    return found


async def drive_traffic(stack: StackInfo, rounds: int) -> None:
    """Successes of several tokens (TTFT and ITL observations) and a caller error (NOT_FOUND)."""
    metadata = (("authorization", f"Bearer {stack.api_key}"),)
    async with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for i in range(rounds):
            await stub.Generate(inference_pb2.GenerateRequest(
                model=stack.reference_model, prompt=f"monitoring {i}",
                params=inference_pb2.SamplingParams(max_tokens=6, seed=i)),
                metadata=metadata, timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(inference_pb2.GenerateRequest(
                    model="no-such-model", prompt="x"), metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_prometheus_scrapes_every_process(stack: StackInfo) -> None:
    def all_up():
        targets = api(stack, "targets")["activeTargets"]
        jobs = {t["labels"]["job"]: t["health"] for t in targets}
        return jobs if set(jobs) == JOBS and set(jobs.values()) == {"up"} else None

    wait_for(all_up, f"every job of {sorted(JOBS)} to be up")


def test_every_rule_is_loaded_and_evaluates_cleanly(stack: StackInfo) -> None:
    expected = {g["name"] for path in (MONITORING / "rules").glob("*.yml")
                for g in yaml.safe_load(path.read_text())["groups"]}

    def evaluated():
        groups = api(stack, "rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = rules and all(r["lastEvaluation"] > "2000" for r in rules)
        return groups if done else None

    groups = wait_for(evaluated, "every rule to be evaluated once")
    assert {g["name"] for g in groups} == expected
    broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
              if r["health"] != "ok"]
    assert not broken
    assert sum(len(g["rules"]) for g in groups) == len(rule_expressions())


async def test_every_metric_a_rule_or_dashboard_reads_is_exported(stack: StackInfo) -> None:
    await drive_traffic(stack, rounds=2)
    expressions = rule_expressions() + dashboard_expressions()
    used = {name for expr in expressions for name in RAW_METRIC.findall(expr)}
    assert {"infermesh_gateway_generations_total", "infermesh_gateway_itl_seconds_bucket",
            "nv_trt_llm_request_metrics", "etcd_server_has_leader", "up"} <= used

    def exported():
        names = set(api(stack, "label/__name__/values")) | declared_metrics(stack)
        return names if used <= names else None

    names = wait_for(exported, "every metric the rules and dashboards use", timeout_s=30)
    recorded = {r["record"] for path in (MONITORING / "rules").glob("*.yml")
                for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]
                if "record" in r}
    assert {n for e in expressions for n in RECORDED.findall(e)} <= recorded
    assert used <= names
    # The SLO thresholds are bucket boundaries the gateway's histograms really have.
    config = slo.load_slo_config()
    for tier in config.tiers.values():
        for name, histogram in slo.LATENCY_HISTOGRAMS.items():
            match = f'{histogram}_bucket{{le="{getattr(tier, name).le}"}}'
            wait_for(lambda m=match: api(stack, "series", **{"match[]": m}),
                     f"{match}: the slo.toml {name} threshold must be a bucket", timeout_s=30)


def test_every_dashboard_query_is_valid_promql(stack: StackInfo) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for expr in expressions:
        concrete = re.sub(r"\$\w+", ".+", expr)  # what "All" selects in a variable
        api(stack, "query", query=concrete)  # a parse error is an HTTP 400


async def test_meshctl_slo_reports_the_demo_model(stack: StackInfo) -> None:
    ratio = RATIO.format(window="1h")
    query = f'{ratio}{{model="{stack.reference_model}"}}'
    deadline = time.monotonic() + 90
    while True:
        # rate() sees only what grows between two scrapes (a series that first appears with
        # all its traffic counted is a rate of 0, and the ratio 0/0 is NaN): keep traffic
        # flowing until every SLO's ratio is a number (rules run every 15 s).
        await drive_traffic(stack, rounds=3)
        samples = api(stack, "query", query=query)["result"]
        if len(samples) == len(slo.SLO_NAMES) and all(
                sample["value"][1] != "NaN" for sample in samples):
            break
        assert time.monotonic() < deadline, f"{query} never held a number for every SLO"
        await asyncio.sleep(2.0)
    result = CliRunner().invoke(app, ["slo", "--prometheus", stack.endpoints["prometheus"]])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()
            if line.startswith(stack.reference_model)]
    assert [row[1] for row in rows] == list(slo.SLO_NAMES)
    availability = rows[0]
    assert availability[2:4] == ["interactive", "99.90%"]
    sli, burn = float(availability[4].rstrip("%")) / 100, float(availability[5].rstrip("x"))
    assert burn == pytest.approx(slo.burn_rate(1 - sli, 0.999), abs=0.01)
    assert re.fullmatch(r"-?\d+\.\d%", availability[6]), availability  # the budget left
    assert "other firing alerts:" in result.output


def test_meshctl_slo_names_an_unreachable_prometheus() -> None:
    result = CliRunner().invoke(app, ["slo", "--prometheus", "127.0.0.1:1"])
    assert result.exit_code == 8  # UNAVAILABLE (meshctl.exits)
    assert "127.0.0.1:1" in result.output
