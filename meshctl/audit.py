"""`meshctl audit …`: verify the log and prove records (offline, on the auditor's files), and
query it (through the auditor, with an API key: admin keys see every tenant, others their own).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Mapping

import grpc
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from infermesh.v1 import auditor_pb2, auditor_pb2_grpc
from meshctl.config import DEFAULT_STATE_DIR
from meshctl.rpc import call_gateway
from services.auditor import reader
from services.auditor.checkpoints import (
    CHECKPOINT_KEY, PUBLIC_KEYS_PREFIX, Checkpoint, key_id, keyring, public_key_from_hex,
)
from services.auditor.verify import format_result, verify
from services.common import errors, etcd

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)

DATA_DIR = typer.Option(DEFAULT_STATE_DIR / "data" / "auditor", "--data-dir",
                        help="The auditor's data directory.")
PUBLIC_KEY = typer.Option(None, "--public-key",
                          help="Trust only this ed25519 public key (hex), not the key file "
                          "beside the log.")
ETCD = typer.Option(None, "--etcd", envvar="INFERMESH_ETCD",
                    help="host:port: trust the keys and checkpoints the auditor published there.")
AGO = re.compile(r"^(\d+)([smhdw])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@audit_app.command("verify")
def audit_verify(
    data_dir: pathlib.Path = DATA_DIR, public_key: str = PUBLIC_KEY, etcd_endpoint: str = ETCD,
) -> None:
    """Check every record, the Merkle tree and every signed checkpoint; exit 1 and name the
    first record that was modified, removed, reordered or truncated."""
    keys, trusted = _trust(data_dir, public_key, etcd_endpoint)
    try:
        result = verify(data_dir, keys=keys, trusted=trusted)
    except FileNotFoundError as exc:
        typer.echo(f"no audit log in {data_dir} ({exc})", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_result(result))
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("prove")
def audit_prove(
    request_id: str = typer.Argument(..., help="The request whose (newest) record to prove."),
    tenant: str = typer.Option(
        "", "--tenant", help="Whose request: ids are chosen by clients and may collide across "
        "tenants ('' = the newest record of any tenant)."),
    data_dir: pathlib.Path = DATA_DIR, public_key: str = PUBLIC_KEY,
) -> None:
    """Print an inclusion proof (JSON) of a request's record in the newest signed tree."""
    view = _view(data_dir)

    def prove() -> reader.InclusionProof:
        sequence = reader.find_sequence(view, request_id, tenant)
        if view.checkpoint is None or view.checkpoint.size < sequence:
            raise errors.NotFound(f"record {sequence} is not in a signed checkpoint yet; the "
                                  "auditor signs one every second, try again")
        return reader.inclusion_proof(view, sequence, view.checkpoint)

    _print_checked(prove, _trust(data_dir, public_key, None)[0])


@audit_app.command("consistency")
def audit_consistency(
    old_size: int = typer.Argument(..., help="Size of an older signed checkpoint."),
    new_size: int = typer.Argument(0, help="Size of a newer one (default: the newest)."),
    data_dir: pathlib.Path = DATA_DIR, public_key: str = PUBLIC_KEY,
) -> None:
    """Print a consistency proof (JSON): the older signed tree is a prefix of the newer."""
    view = _view(data_dir)

    def prove() -> reader.ConsistencyProof:
        new = reader.checkpoint_of_size(view, new_size) if new_size else view.checkpoint
        if new is None:
            raise errors.NotFound("the log has no checkpoint yet")
        return reader.consistency_proof(view, reader.checkpoint_of_size(view, old_size), new)

    _print_checked(prove, _trust(data_dir, public_key, None)[0])


@audit_app.command("check-proof")
def audit_check_proof(
    proof_file: typer.FileText = typer.Argument(..., help="A proof printed by prove or "
                                                "consistency ('-' reads stdin)."),
    public_key: str = typer.Option(..., "--public-key", help="The auditor's key (hex)."),
) -> None:
    """Check a proof with nothing but the auditor's public key (for a third party)."""
    value = json.load(proof_file)
    proof = (reader.ConsistencyProof.from_json(value) if "old" in value
             else reader.InclusionProof.from_json(value))
    key = public_key_from_hex(public_key)
    problem = proof.check({key_id(key): key})
    typer.echo(f"proof BROKEN: {problem}" if problem else "proof OK")
    if problem:
        raise typer.Exit(1)


@audit_app.command("query")
def audit_query(
    tenant: str = typer.Option("", "--tenant", help="Only this tenant (admin keys: any)."),
    since: str = typer.Option(None, "--since", help="ISO time, or a duration ago: 15m, 2h, 7d."),
    until: str = typer.Option(None, "--until", help="ISO time, or a duration ago."),
    model: str = typer.Option("", "--model", help="Model name or version id."),
    request_id: str = typer.Option("", "--request-id"),
    limit: int = typer.Option(1000, "--limit", help="Most records."),
    output: pathlib.Path = typer.Option(None, "--output", "-o",
                                        help="Write JSON lines here (default stdout)."),
    auditor: str = typer.Option(None, "--auditor", envvar="INFERMESH_AUDITOR",
                                help="host:port (default: the local stack's auditor)"),
    api_key: str = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]"),
) -> None:
    """Export matching records as JSON lines, exactly as stored (each verifiable on its own:
    its hash, and its Merkle leaf for `prove`)."""
    request = auditor_pb2.QueryRequest(tenant=tenant, model=model, request_id=request_id,
                                       limit=limit)
    if since:
        request.since.FromDatetime(_when(since))
    if until:
        request.until.FromDatetime(_when(until))

    async def run(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> int:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        sink = open(output, "w") if output else sys.stdout
        count = 0
        try:
            async for record in stub.Query(request, metadata=metadata, timeout=120):
                sink.write(record.line + "\n")
                count += 1
        finally:
            if output:
                sink.close()
        return count

    count = call_gateway(_auditor_endpoint(auditor), api_key, run)
    typer.echo(f"{count} records", err=True)


def _when(text: str) -> datetime.datetime:
    match = AGO.match(text)
    now = datetime.datetime.now(datetime.UTC)
    if match:
        return now - datetime.timedelta(seconds=int(match.group(1)) * UNIT_S[match.group(2)])
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use an ISO time or a duration like 2h") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _auditor_endpoint(explicit: str | None) -> str:
    if explicit:
        return explicit
    from deploy.local.state import load_state

    state = load_state(DEFAULT_STATE_DIR)
    if state is None or "auditor" not in state.endpoints:
        raise typer.BadParameter("no auditor: pass --auditor or set INFERMESH_AUDITOR")
    return state.endpoints["auditor"]


def _view(data_dir: pathlib.Path) -> reader.LogView:
    try:
        return reader.view_of(data_dir)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _trust(
    data_dir: pathlib.Path, public_key: str | None, etcd_endpoint: str | None
) -> tuple[Mapping[str, Ed25519PublicKey], list[Checkpoint]]:
    """The keys (and outside checkpoints) to trust, strongest source given first."""
    if etcd_endpoint:
        try:
            keys, published = asyncio.run(_from_etcd(etcd_endpoint))
        except Exception as exc:  # etcd unreachable, or what it holds does not parse
            typer.echo(f"error: cannot read the audit keys from etcd at {etcd_endpoint}: "
                       f"{exc!r}", err=True)
            raise typer.Exit(1) from None
        # etcd may hold other logs' checkpoints (one per signing key): keep this log's.
        newest = _view(data_dir).checkpoint
        trusted = [c for c in published if newest is not None and c.key_id == newest.key_id]
        if public_key:
            key = public_key_from_hex(public_key)
            keys = {key_id(key): key}
        typer.echo(f"trusting {len(keys)} key(s) and {len(trusted)} checkpoint(s) from etcd "
                   f"{etcd_endpoint}", err=True)
        return keys, trusted
    if public_key:
        key = public_key_from_hex(public_key)
        return {key_id(key): key}, []
    try:
        keys = reader.local_keys(data_dir)
    except FileNotFoundError:
        typer.echo(f"no audit log in {data_dir}", err=True)
        raise typer.Exit(1) from None
    typer.echo("trusting the public key beside the log (pass --etcd or --public-key to also "
               "catch someone who can rewrite the auditor's disk)", err=True)
    return keys, []


async def _from_etcd(endpoint: str) -> tuple[dict[str, Ed25519PublicKey], list[Checkpoint]]:
    async with etcd.connect(endpoint, float(os.environ.get("INFERMESH_ETCD_TIMEOUT_S", 5))) as c:
        keys = keyring(kv.value for kv in await c.get_prefix(PUBLIC_KEYS_PREFIX.encode()))
        published = [Checkpoint.from_record(json.loads(kv.value))
                     for kv in await c.get_prefix(f"{CHECKPOINT_KEY}/".encode())]
    return keys, published


def _print_checked(prove: Callable[[], reader.InclusionProof | reader.ConsistencyProof],
                   keys: Mapping[str, Ed25519PublicKey]) -> None:
    """Builds the proof, prints it (JSON), and checks it with the trusted keys (exit 1 if it
    does not hold, or cannot be built)."""
    try:
        proof = prove()
    except errors.MeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(reader.proof_to_text(proof))
    problem = proof.check(dict(keys))
    typer.echo(f"proof BROKEN: {problem}" if problem else "proof OK (checked with the trusted "
               "key)", err=True)
    if problem:
        raise typer.Exit(1)
