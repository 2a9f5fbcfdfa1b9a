"""meshctl scripts well (issue 20): contexts pick the endpoints, exit codes follow the status
(with the RetryInfo delay shown), times parse and print one way, and docs/cli.md is current."""

from __future__ import annotations

import datetime
import json
import pathlib

import grpc
import pytest
import typer
from typer.testing import CliRunner

from deploy.local.certificates import make_mesh_certificates
from deploy.local.state import StackInfo, load_state, write_state
from meshctl import config, exits, times
from meshctl.__main__ import app
from meshctl.reference import render
from services.common import errors, tls
from services.common.status import to_rich_status

ROOT = pathlib.Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_the_committed_reference_is_current() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == render(app), (
        "run `.venv/bin/python -m meshctl.reference > docs/cli.md`")


def stack_in(directory: pathlib.Path, gateway: str, key: str) -> pathlib.Path:
    directory.mkdir(parents=True)
    write_state(directory, StackInfo(
        gateway=gateway, api_key=key, model="m", reference_model="r", etcd="e:1",
        endpoints={"registry": f"{gateway}-registry", "scheduler": "s:1", "triton": "t:1",
                   "prometheus": "p:1", "auditor": "a:1"}, metrics={"triton": "tm:1"}, pids={}))
    return directory


@pytest.fixture
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """No INFERMESH_* variables; a config file and a working-directory stack of our own."""
    for name in ("GATEWAY", "REGISTRY", "API_KEY", "CONTEXT", "SCHEDULER"):
        monkeypatch.delenv(f"INFERMESH_{name}", raising=False)
    monkeypatch.setenv("INFERMESH_CONFIG", str(tmp_path / "config.yaml"))
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(stack_in(tmp_path / "cwd", "cwd:1", "k-cwd")))
    monkeypatch.setattr(config, "selected_context", None)
    return tmp_path


def test_contexts_select_the_endpoints(home: pathlib.Path, monkeypatch) -> None:
    assert config.gateway_and_key(None, None) == ("cwd:1", "k-cwd")  # the embedded stack
    (home / "prod.key").write_text("k-prod\n")
    made = runner.invoke(app, ["config", "set-context", "prod", "--gateway", "prod:1",
                               "--registry", "prodreg:1", "--api-key-file",
                               str(home / "prod.key")])
    assert made.exit_code == 0, made.output
    stack_in(home / "other", "other:1", "k-other")
    assert runner.invoke(app, ["config", "set-context", "local", "--state-dir",
                               str(home / "other")]).exit_code == 0
    # The first context made is current; the file holds the key's path, never the key.
    assert "k-prod" not in (home / "config.yaml").read_text()
    assert config.gateway_and_key(None, None) == ("prod:1", "k-prod")
    assert config.service_endpoint("registry", None) == "prodreg:1"
    with pytest.raises(typer.BadParameter):  # not named: never the cwd stack's
        config.service_endpoint("scheduler", None)
    assert runner.invoke(app, ["config", "use-context", "local"]).exit_code == 0
    assert config.gateway_and_key(None, None) == ("other:1", "k-other")
    assert config.service_endpoint("registry", None) == "other:1-registry"
    monkeypatch.setenv("INFERMESH_GATEWAY", "env:1")  # the environment beats the context...
    with pytest.raises(typer.BadParameter):  # ...but the context's key is not sent to it
        config.gateway_and_key(None, None)
    monkeypatch.setenv("INFERMESH_API_KEY", "k-env")
    assert config.gateway_and_key(None, None) == ("env:1", "k-env")
    assert config.gateway_and_key("flag:1", "k-flag") == ("flag:1", "k-flag")  # flags beat all
    current = runner.invoke(app, ["--context", "prod", "config", "current-context"])
    assert current.stdout.strip() == "prod"
    listed = runner.invoke(app, ["config", "get-contexts", "-o", "json"])
    assert [(c["name"], c["current"]) for c in json.loads(listed.stdout)] == [
        ("local", True), ("prod", False)]
    table = runner.invoke(app, ["config", "get-contexts"]).stdout.splitlines()
    assert table[0].split()[:3] == ["CURRENT", "NAME", "GATEWAY"]
    assert runner.invoke(app, ["config", "use-context", "nope"]).exit_code == 5
    assert runner.invoke(app, ["--context", "nope", "config", "current-context"]).exit_code == 2


def rpc_error(error: errors.MeshError) -> grpc.aio.AioRpcError:
    status = to_rich_status(error)
    return grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(),
                                grpc.aio.Metadata(*status.trailing_metadata), error.message)


def test_tls_comes_from_where_the_endpoint_came_from(home: pathlib.Path, monkeypatch) -> None:
    """The local stack's CA verifies the local stack's endpoints; a flag's endpoint takes the
    environment's TLS files (the system's roots when there are none), never the stack's."""
    tls_dir = home / "cwd" / "tls"
    make_mesh_certificates(tls_dir, ("operator",))
    info = load_state(home / "cwd")
    assert info is not None
    info.tls_dir = str(tls_dir)
    write_state(home / "cwd", info)
    for name in ("CA", "CERT", "KEY"):
        monkeypatch.delenv(f"INFERMESH_TLS_{name}_FILE", raising=False)
    monkeypatch.delenv("INFERMESH_TLS_MODE", raising=False)
    local = config.tls_for("gateway", None)
    assert local is not None and local.ca == (tls_dir / "ca.pem").read_bytes()
    assert local.cert == (tls_dir / "operator.pem").read_bytes()
    assert config.tls_for("gateway", "elsewhere:443") == tls.MeshTls(ca=None)  # system roots
    monkeypatch.setenv("INFERMESH_TLS_MODE", "plaintext-development")
    assert config.tls_for("gateway", "localhost:1") is None
    monkeypatch.setenv("INFERMESH_TLS_CA_FILE", str(tls_dir / "ca.pem"))
    assert config.tls_for("registry", "elsewhere:1").cert is None  # the CA alone, as given


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidArgument("params.max_tokens", "must be 1..1024"), 3),
    (errors.Unauthenticated("no key"), 4), (errors.PermissionDenied("admin only"), 4),
    (errors.NotFound("no tenant acme"), 5), (errors.FailedPrecondition("revision 3, not 2"), 6),
    (errors.ResourceExhausted("rpm 60 reached", retry_after_s=20.5), 7),
    (errors.Unavailable("no replica"), 8), (errors.Internal("bug"), 1),
])
def test_a_refusal_exits_with_its_code_and_shows_the_retry_delay(error, code, capsys) -> None:
    with pytest.raises(typer.Exit) as exited:
        exits.fail_error(rpc_error(error))
    assert exited.value.exit_code == code
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {error.code}: ")
    if error.retry_after_s is not None:
        assert line == "error: RESOURCE_EXHAUSTED: rpm 60 reached (retry in 20.5 s)"


def test_usage_errors_exit_2_and_version(home) -> None:
    assert runner.invoke(app, ["replicas", "-o", "xml"]).exit_code == 2
    assert runner.invoke(app, ["audit", "query", "--since", "yesterday"]).exit_code == 2
    old = runner.invoke(app, ["audit", "query", "-o", "records.jsonl"])
    assert old.exit_code == 2 and "--file records.jsonl" in old.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("meshctl ")


def test_durations_and_times_parse_and_print_one_way() -> None:
    now = datetime.datetime(2026, 12, 3, 10, 0, tzinfo=datetime.UTC)
    assert times.parse_duration("90s") == 90 and times.parse_duration("1.5h") == 5400
    assert times.parse_time("2h", now=now) == now - datetime.timedelta(hours=2)
    assert times.parse_time("30d", future=True, now=now) == now + datetime.timedelta(days=30)
    assert times.parse_time("2026-12-03T12:00:00+02:00") == now
    assert {times.format_time(v) for v in (now, now.timestamp(), "2026-12-03T10:00:00Z")} == {
        "2026-12-03T10:00:00Z"}
    assert times.format_time(0.0) == "-"
    assert [times.format_duration(s) for s in (20.5, 300, 7200 * 3)] == ["20.5 s", "5.0 min",
                                                                         "6.0 h"]
    with pytest.raises(typer.BadParameter):
        times.parse_duration("soon")
