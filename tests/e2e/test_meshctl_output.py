"""Every read command of meshctl in every `-o` format against the real stack (issue 20): JSON
and YAML parse (to the same data), a table starts with its header, wide adds columns."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from deploy.local.state import StackInfo
from meshctl.__main__ import app

# An admin's meshctl, with flags: the operator's certificate from operator-env.
pytestmark = pytest.mark.operator
runner = CliRunner()


def commands(stack: StackInfo, stack_dir) -> dict[str, tuple[list[str], list[str]]]:
    """A name → (the command line, the table's first header cells)."""
    registry = ["--registry", stack.endpoints["registry"], "--api-key", stack.api_key]
    gateway = ["--gateway", stack.gateway, "--api-key", stack.api_key]
    return {
        "registry list": (["registry", "list", *registry], ["MODEL", "REVISION", "PRODUCTION"]),
        "registry list MODEL": (["registry", "list", stack.model, *registry],
                                ["VERSION", "REGISTERED", "ROLE"]),
        "registry history": (["registry", "history", stack.model, *registry],
                             ["REVISION", "AT", "ACTOR", "ACTION"]),
        "registry show": (["registry", "show", stack.model, *registry], [f"{stack.model}@sha256:"]),
        "tenant list": (["tenant", "list", *gateway], ["TENANT", "PRIORITY", "RPM"]),
        "key list": (["key", "list", *gateway], ["KEY-ID", "TENANT", "ROLE", "EXPIRES"]),
        "replicas": (["replicas", "--scheduler", stack.endpoints["scheduler"]],
                     ["REPLICA", "ZONE", "ROUTABLE", "BREAKER"]),
        "stack status": (["stack", "status", "--state-dir", str(stack_dir)],
                         ["PROCESS", "PID", "ALIVE", "HEALTH"]),
        "audit query": (["audit", "query", "--auditor", stack.endpoints["auditor"], "--api-key",
                         stack.api_key, "--since", "1h", "--limit", "3"],
                        ["SEQ", "AT", "KIND", "TENANT"]),
        "slo": (["slo", "--prometheus", stack.endpoints["prometheus"]], []),
    }


def invoke(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


@pytest.mark.parametrize("name", ["registry list", "registry list MODEL", "registry history",
                                  "registry show", "tenant list", "key list", "replicas",
                                  "stack status", "audit query", "slo"])
def test_each_read_command_in_each_format(stack: StackInfo, stack_dir, name: str) -> None:
    args, header = commands(stack, stack_dir)[name]
    as_json = json.loads(invoke([*args, "-o", "json"]))
    assert as_json, name
    as_yaml = yaml.safe_load(invoke([*args, "-o", "yaml"]))
    if name in ("replicas", "stack status", "slo"):  # live figures move between two calls
        assert type(as_yaml) is type(as_json) and len(as_yaml) == len(as_json)
    else:
        assert as_yaml == as_json
    table = invoke([*args, "-o", "table"]).splitlines()
    default = invoke(args).splitlines()
    wide = invoke([*args, "-o", "wide"]).splitlines()
    if name == "slo" and not as_json["slos"]:
        assert table[-1].startswith("other firing alerts:")
        return
    if name == "slo":
        header = ["MODEL", "SLO", "TIER", "OBJECTIVE"]
    if name == "registry show":
        assert table[0].startswith(header[0]) and table == default == wide
        return
    assert table[0].split()[:len(header)] == header, table[:2]
    if name == "audit query":  # its default stays JSON lines, each record exactly as stored
        assert [json.loads(line) for line in default] == as_json
    else:
        assert default[0] == table[0]
    assert len(table) > 1
    assert wide[0].split()[:len(header)] == header
    if name not in ("stack status", "replicas"):  # live figures may move between two calls
        assert len(wide[0]) > len(table[0]) or wide[0] == table[0]


def test_tenant_show_and_stable_field_names(stack: StackInfo) -> None:
    gateway = ["--gateway", stack.gateway, "--api-key", stack.api_key]
    tenants = json.loads(invoke(["tenant", "list", *gateway, "-o", "json"]))
    first = tenants[0]["tenant_id"]
    shown = json.loads(invoke(["tenant", "show", first, *gateway, "-o", "json"]))
    assert {"tenant_id", "plan", "revision", "tokens_used"} <= set(shown)
    assert "requests_per_minute" in shown["plan"]
    table = invoke(["tenant", "show", first, *gateway]).splitlines()
    assert table[0].split()[:3] == ["TENANT", "PRIORITY", "RPM"] and table[1].startswith(first)
    assert yaml.safe_load(invoke(["tenant", "show", first, *gateway, "-o", "yaml"])) == shown
    missing = runner.invoke(app, ["tenant", "show", "no-such-tenant-x", *gateway])
    assert missing.exit_code == 5 and "NOT_FOUND" in missing.stderr
    denied = runner.invoke(app, ["tenant", "list", "--gateway", stack.gateway, "--api-key",
                                 "not-a-key"])
    assert denied.exit_code == 4 and "UNAUTHENTICATED" in denied.stderr


def test_audit_query_writes_a_file(stack: StackInfo, tmp_path) -> None:
    target = tmp_path / "records.jsonl"
    result = runner.invoke(app, ["audit", "query", "--auditor", stack.endpoints["auditor"],
                                 "--api-key", stack.api_key, "--since", "1h", "--limit", "2",
                                 "--file", str(target)])
    assert result.exit_code == 0 and result.stdout == "", result.output
    assert [json.loads(line)["seq"] for line in target.read_text().splitlines()]
