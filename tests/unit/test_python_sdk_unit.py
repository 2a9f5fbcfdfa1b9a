"""The Python SDK's pure parts: exported names, errors from status details, the retry policy,
endpoint resolution. No network."""

from __future__ import annotations

import asyncio
import pathlib

import infermesh_client
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from infermesh_client import InvalidArgument, RateLimited, RetryPolicy, ServerError, Unavailable
from infermesh_client._config import ConfigurationError, resolve
from infermesh_client._errors import details_from_status, error_for


def test_exported_members_match_all():
    public = {name for name in dir(infermesh_client) if not name.startswith("_")}
    public -= {"annotations"}
    assert set(infermesh_client.__all__) - {"__version__"} == public


def _status(*details) -> bytes:
    packed = []
    for detail in details:
        any_message = any_pb2.Any()
        any_message.Pack(detail)
        packed.append(any_message)
    return status_pb2.Status(code=8, message="m", details=packed).SerializeToString()


def test_details_come_from_error_info_and_retry_info():
    info = error_details_pb2.ErrorInfo(reason="RESOURCE_EXHAUSTED", domain="infermesh.dev")
    info.metadata["reason"] = "rpm"
    info.metadata["field"] = "model"
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=1, nanos=5 * 10**8))
    details = details_from_status(_status(info, retry))
    assert details == {"reason": "rpm", "field": "model", "retry_after": 1.5}
    error = error_for("RESOURCE_EXHAUSTED", "rpm: over", **details)
    assert isinstance(error, RateLimited) and error.retry_after == 1.5 and error.reason == "rpm"
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="params.top_p", description="1.5")])
    assert details_from_status(_status(bad)) == {"field": "params.top_p"}
    assert isinstance(error_for("INVALID_ARGUMENT", "x", field="f"), InvalidArgument)
    unknown = error_for("DATA_LOSS", "gone")
    assert isinstance(unknown, ServerError) and unknown.code == "DATA_LOSS"


def test_retry_policy_waits_only_for_server_delays_within_budget():
    policy = RetryPolicy(max_attempts=3, max_wait=5.0, max_delay=4.0)
    limited = RateLimited("rpm", retry_after=1.0)
    assert policy.delay(limited, attempt=1, waited=0.0, remaining=None) == 1.0
    assert policy.delay(limited, attempt=3, waited=0.0, remaining=None) is None  # attempts
    assert policy.delay(limited, attempt=1, waited=4.5, remaining=None) is None  # budget
    assert policy.delay(limited, attempt=1, waited=0.0, remaining=0.5) is None  # deadline
    assert policy.delay(RateLimited("x", retry_after=4.5), 1, 0.0, None) is None  # too long
    assert policy.delay(RateLimited("no delay"), 1, 0.0, None) is None
    assert policy.delay(Unavailable("loading", retry_after=0.2), 1, 0.0, None) == 0.2
    assert policy.delay(InvalidArgument("bad", retry_after=0.2), 1, 0.0, None) is None


def test_endpoint_resolution_order(tmp_path: pathlib.Path):
    env_file = tmp_path / "env"
    env_file.write_text("export INFERMESH_GATEWAY=file:1\nexport INFERMESH_API_KEY='k f'\n")
    environ = {"INFERMESH_ENV_FILE": str(env_file)}
    assert resolve(None, None, None, environ) == resolve("file:1", "k f", False, {})
    environ["INFERMESH_GATEWAY"] = "env:2"
    assert resolve(None, None, None, environ).target == "env:2"
    assert resolve("arg:3", "key", None, environ).target == "arg:3"
    assert resolve("https://tls:4", None, None, environ).tls is True
    with pytest.raises(ConfigurationError, match="INFERMESH_GATEWAY"):
        resolve(None, None, None, {"INFERMESH_STATE_DIR": str(tmp_path / "none")})


def test_a_key_is_only_sent_to_the_gateway_it_came_with(tmp_path: pathlib.Path):
    """A local stack's env file (maybe planted) and the user's own key never mix."""
    env_file = tmp_path / "env"
    env_file.write_text("export INFERMESH_GATEWAY=local:1\nexport INFERMESH_API_KEY=local-key\n")
    environ = {"INFERMESH_ENV_FILE": str(env_file)}
    assert resolve("prod:443", None, None, environ).api_key is None  # not the file's key
    mine = dict(environ, INFERMESH_API_KEY="my-key")
    assert resolve(None, None, None, mine) == resolve("local:1", "local-key", False, {})
    assert resolve("prod:443", None, None, mine).api_key == "my-key"
    assert resolve(None, None, None, dict(mine, INFERMESH_GATEWAY="prod:443")).api_key == \
        "my-key"



def test_the_registry_and_the_auditor_take_the_key_of_their_own_source(tmp_path: pathlib.Path):
    env_file = tmp_path / "env"
    env_file.write_text("export INFERMESH_REGISTRY=local:2\nexport INFERMESH_API_KEY=local-key\n")
    environ = {"INFERMESH_ENV_FILE": str(env_file), "INFERMESH_API_KEY": "my-key",
               "INFERMESH_AUDITOR": "prod:3"}
    assert resolve(None, None, None, environ, service="registry") == resolve(
        "local:2", "local-key", False, {})
    assert resolve(None, None, None, environ, service="auditor") == resolve(
        "prod:3", "my-key", False, {})
    with pytest.raises(ConfigurationError, match=r"registry_target=.*INFERMESH_REGISTRY"):
        resolve(None, None, None, {"INFERMESH_ENV_FILE": str(tmp_path / "none")},
                service="registry")


def test_the_admin_dataclasses_mirror_their_messages():
    """A field added to the API shows up in the SDK's types (or this fails)."""
    import dataclasses

    from infermesh_client import _proto
    from infermesh_client._admin_types import (
        AdminRecord,
        GenerationRecord,
        KeyInfo,
        Plan,
        PlanChange,
        Routing,
    )

    # The SDK's names for times the API moved from double seconds to Timestamps.
    sdk_names = {"create_time": "created_at", "expire_time": "expires_at"}
    for cls, message in ((Plan, "Plan"), (PlanChange, "PlanUpdate"), (KeyInfo, "KeyInfo"),
                         (Routing, "Routing"), (GenerationRecord, "GenerationRecord"),
                         (AdminRecord, "AdminRecord")):
        fields = _proto.message(f"infermesh.v1.{message}").DESCRIPTOR.fields
        current = {sdk_names.get(f.name, f.name) for f in fields if not f.GetOptions().deprecated}
        public = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        assert public == current, cls


def test_key_times_come_from_the_timestamps_or_from_an_older_servers_seconds():
    from infermesh_client import _proto
    from infermesh_client._admin_codec import key_info

    message = _proto.message("infermesh.v1.KeyInfo")
    current = message(created_at=1.0, expires_at=2.0)  # the seconds only ever mirror these
    current.create_time.FromJsonString("2026-12-03T10:00:00Z")
    current.expire_time.FromJsonString("2027-01-01T00:00:00Z")
    key = key_info(current)
    assert (key.created_at.isoformat(), key.expires_at.isoformat()) == (
        "2026-12-03T10:00:00+00:00", "2027-01-01T00:00:00+00:00")
    older = key_info(message(created_at=1_796_292_000.0))
    assert older.created_at.isoformat() == "2026-12-03T10:00:00+00:00"
    assert older.expires_at is None


def test_a_result_read_from_the_mesh_gives_its_api_form():
    """`to_dict()` is the API's JSON mapping (what meshctl prints for -o json): zeros too,
    timestamps as RFC 3339; a result built by hand has none."""
    from infermesh_client import _proto
    from infermesh_client._admin_codec import history_page, key_info

    page = _proto.message("infermesh.v1.ListHistoryResponse")()
    entry = page.entries.add(revision=3, action="promote")
    entry.before.model = "m"
    entry.at.FromJsonString("2026-12-03T10:00:00Z")
    decoded = history_page(page)
    assert decoded.entries[0].at.isoformat() == "2026-12-03T10:00:00+00:00"
    as_dict = decoded.to_dict()
    assert as_dict["next_before_revision"] == "0"  # int64: a string, as the JSON mapping says
    assert as_dict["entries"][0]["at"] == "2026-12-03T10:00:00Z"
    assert as_dict["entries"][0]["before"]["canary_weight_percent"] == 0
    assert decoded.entries[0].to_dict() == as_dict["entries"][0]
    key = key_info(_proto.message("infermesh.v1.KeyInfo")(key_id="k1", role="admin"))
    assert key.to_dict()["key_id"] == "k1" and key.expires_at is None
    with pytest.raises(ValueError, match="built by hand"):
        infermesh_client.RoutingChange(decoded.entries[0].after, decoded.entries[0]).to_dict()


def test_endpoints_resolve_when_first_used_and_a_given_certificate_wins(tmp_path, monkeypatch):
    """A client of the registry alone needs no gateway; a certificate passed as bytes wins
    over the files that came with the endpoint."""
    from infermesh_client import Client
    from infermesh_client._config import Endpoint

    monkeypatch.setenv("INFERMESH_ENV_FILE", str(tmp_path / "none"))
    for name in ("GATEWAY", "REGISTRY", "AUDITOR", "API_KEY", "TLS_CERT_FILE"):
        monkeypatch.delenv(f"INFERMESH_{name}", raising=False)
    client = Client(registry_target="registry:1", api_key="k")
    try:
        with pytest.raises(ConfigurationError, match="INFERMESH_GATEWAY"):
            client.target  # noqa: B018 - resolving it is the point
    finally:
        client.close()
    (tmp_path / "cert.pem").write_bytes(b"file-cert")
    (tmp_path / "key.pem").write_bytes(b"file-key")
    endpoint = Endpoint("r:1", "k", True, None, str(tmp_path / "cert.pem"),
                        str(tmp_path / "key.pem"))
    assert endpoint.tls_material(b"ca") == (b"ca", b"file-key", b"file-cert")
    assert endpoint.tls_material(b"ca", b"my-key", b"my-cert") == (b"ca", b"my-key", b"my-cert")


def test_a_stack_ca_verifies_only_the_gateway_it_came_with(tmp_path: pathlib.Path):
    """The env file's CA turns TLS on for the env file's gateway; a gateway from the
    environment takes the environment's CA, never the file's."""
    env_file = tmp_path / "env"
    env_file.write_text("export INFERMESH_GATEWAY=local:1\n"
                        "export INFERMESH_TLS_CA_FILE=/stack/tls/ca.pem\n")
    environ = {"INFERMESH_ENV_FILE": str(env_file)}
    local = resolve(None, None, None, environ)
    assert (local.tls, local.ca_file) == (True, "/stack/tls/ca.pem")
    remote = resolve(None, None, None, dict(environ, INFERMESH_GATEWAY="prod:443"))
    assert (remote.tls, remote.ca_file) == (False, None)
    assert resolve("prod:443", None, True, environ).ca_file is None  # the system's roots
    mine = dict(environ, INFERMESH_GATEWAY="prod:443", INFERMESH_TLS_CA_FILE="/mine.pem")
    assert resolve(None, None, None, mine).ca_file == "/mine.pem"


async def test_a_retired_call_keeps_its_generations_and_new_ones_start_on_a_new_call():
    """Past the gateway's stream age a call takes no more Starts: the next start opens a new
    call, the old one is half-closed once its last generation has finished."""
    from infermesh_client import _proto
    from infermesh_client._multiplex import StreamMultiplexer

    class FakeCall:
        def __init__(self, outgoing):
            self.sent, self.half_closed = [], asyncio.Event()
            self.incoming: asyncio.Queue = asyncio.Queue()
            self.pump = asyncio.ensure_future(self._pump(outgoing))

        async def _pump(self, outgoing):
            async for frame in outgoing:
                self.sent.append(frame)
            self.half_closed.set()

        def __aiter__(self):
            return self

        async def __anext__(self):
            frame = await self.incoming.get()
            if frame is None:
                raise StopAsyncIteration
            return frame

        def cancel(self):
            self.incoming.put_nowait(None)

    calls: list[FakeCall] = []

    def open_call(outgoing):
        calls.append(FakeCall(outgoing))
        return calls[-1]

    streams = StreamMultiplexer(open_call)
    first = streams.start(_proto.GenerateRequest(request_id="old"))
    streams.retire()
    streams.start(_proto.GenerateRequest(request_id="new"))
    assert len(calls) == 2 and not calls[0].half_closed.is_set()
    final = _proto.ServerFrame()
    final.final.request_id = "old"
    calls[0].incoming.put_nowait(final)
    assert (await first.get()).final.request_id == "old"  # the old call still serves its own
    streams.finished("old")
    # ...and ends once it has none left (asyncio.wait: these tests also run on Python 3.9)
    done, _ = await asyncio.wait({asyncio.ensure_future(calls[0].half_closed.wait())}, timeout=5)
    assert done, "the retired call was never half-closed"
    assert [f.start.request_id for f in calls[1].sent] == ["new"]
    await streams.close()
