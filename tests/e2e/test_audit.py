"""The audit log in the running stack: the auditor unreachable for 10 s while generations keep
coming (none of them fails, and once it is back every one of their events is in the log, which
still verifies), and the operator's `meshctl audit` commands against the stack.

The auditor is frozen (SIGSTOP) rather than killed, so the shared stack keeps its process: to
the gateway that is an auditor whose calls hang and whose registration expires, the worst kind
of outage. (A killed auditor losing nothing it acknowledged is
tests/integration/test_auditor_service.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid

import grpc
import pytest
from typer.testing import CliRunner

from deploy.local.stack import StackInfo
from infermesh.v1 import inference_pb2, inference_pb2_grpc
from meshctl.__main__ import app
from services.auditor import reader
from services.auditor.verify import format_result, verify
from tests.e2e.test_tenants_and_quotas import auth, new_tenant

pytestmark = pytest.mark.integration

OUTAGE_S = 10.0
CLIENTS = 3


def logged_request_ids(audit_dir) -> set[str]:
    view = reader.view_of(audit_dir)
    return {json.loads(line)["event"].get("request_id", "") for _seq, line in reader.lines(view)}


async def test_generations_succeed_and_no_event_is_lost_while_the_auditor_is_down(
    stack: StackInfo, stack_dir
) -> None:
    audit_dir = stack_dir / "data" / "auditor"
    auditor_pid = stack.pids["auditor"]
    # A tenant of its own with room for the whole burst: the demo tenant's 600 requests a minute
    # are shared with every other e2e test, and this one alone sends hundreds in 10 s.
    _, key = await new_tenant(stack, requests_per_minute=100_000, max_concurrency=CLIENTS * 2,
                              input_tokens_per_minute=10_000_000,
                              output_tokens_per_minute=10_000_000)
    metadata = auth(key)
    served: list[str] = []
    failed: list[str] = []
    run = uuid.uuid4().hex[:8]

    async def client(stub: inference_pb2_grpc.InferenceStub, number: int, until: float) -> None:
        for index in range(1000):
            if time.monotonic() >= until:
                return
            request_id = f"outage-{run}-{number}-{index}"
            try:
                await stub.Generate(inference_pb2.GenerateRequest(
                    request_id=request_id, model=stack.model, prompt="Say something short.",
                    params=inference_pb2.SamplingParams(max_tokens=2, seed=index)),
                    metadata=metadata, timeout=30)
                served.append(request_id)
            except grpc.aio.AioRpcError as exc:
                failed.append(f"{request_id}: {exc.code().name} {exc.details()}")

    os.kill(auditor_pid, signal.SIGSTOP)
    try:
        async with stack.channel() as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            until = time.monotonic() + OUTAGE_S
            async with asyncio.timeout(OUTAGE_S + 60):
                await asyncio.gather(*(client(stub, n, until) for n in range(CLIENTS)))
    finally:
        os.kill(auditor_pid, signal.SIGCONT)
    assert not failed, failed[:5]
    assert served

    deadline = time.monotonic() + 45
    while missing := set(served) - logged_request_ids(audit_dir):
        assert time.monotonic() < deadline, f"{len(missing)} of {len(served)} events lost"
        await asyncio.sleep(0.5)
    result = verify(audit_dir)
    assert result.ok, format_result(result)


@pytest.mark.operator
def test_meshctl_audit_against_the_stack(stack: StackInfo, stack_dir) -> None:
    """verify trusting etcd, query (export as JSON lines) with the stack's admin key, prove."""
    audit_dir = str(stack_dir / "data" / "auditor")
    runner = CliRunner()
    verified = runner.invoke(app, ["audit", "verify", "--data-dir", audit_dir,
                                   "--etcd", stack.etcd])
    assert verified.exit_code == 0 and verified.stdout.startswith("audit log OK"), (
        verified.output)
    assert "from etcd" in verified.stderr
    exported = runner.invoke(app, ["audit", "query", "--auditor", stack.endpoints["auditor"],
                                   "--api-key", stack.api_key, "--since", "1h", "--limit", "5"])
    assert exported.exit_code == 0, exported.output
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert 1 <= len(records) <= 5 and all(r["event"]["event_id"] for r in records)
    request_id = next(r["event"]["request_id"] for r in records if r["event"].get("request_id"))
    deadline = time.monotonic() + 10  # the auditor signs a checkpoint every second
    while (proved := runner.invoke(app, ["audit", "prove", request_id, "--data-dir",
                                         audit_dir])).exit_code:
        assert time.monotonic() < deadline, proved.output
        time.sleep(0.5)
    assert json.loads(proved.stdout)["record"].startswith('{"seq":')
