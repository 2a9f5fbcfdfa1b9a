"""`meshctl audit …`: verify the log and prove records (offline, on the auditor's files), and
query it (through the auditor, with an API key: admin keys see every tenant, others their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
from collections.abc import Callable, Mapping

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshctl.client import mesh_client
from meshctl.config import DEFAULT_STATE_DIR, tls_for
from meshctl.output import Column, OutputFormat, emit
from meshctl.times import format_time, parse_time
from services.auditor import reader
from services.auditor.checkpoints import (
    CHECKPOINT_KEY,
    PUBLIC_KEYS_PREFIX,
    Checkpoint,
    key_id,
    keyring,
    public_key_from_hex,
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


QUERY_FORMATS = ("jsonl", "table", "wide", "json", "yaml")
QUERY_TIMEOUT_S = 120.0  # a query may scan many segments


def _query_format(value: str) -> str:
    """`-o` picks a format; it once named the output file, so a path gets a usage error that
    says what to write instead."""
    if value.lower() in QUERY_FORMATS:
        return value.lower()
    raise typer.BadParameter(
        f"{value!r} is not an output format ({', '.join(QUERY_FORMATS)}): -o/--output no "
        f"longer names a file; write the records to one with --file {value}")


def _event(record: dict) -> dict:
    return record.get("event") or {}


def _body(record: dict) -> dict:
    event = _event(record)
    return event.get("generation") or event.get("admin") or {}


QUERY_COLUMNS = [
    Column("SEQ", lambda r: r.get("seq"), right=True),
    Column("AT", lambda r: format_time(r["at"] / 1000) if r.get("at") else None),
    Column("KIND", lambda r: "generation" if "generation" in _event(r)
           else "admin" if "admin" in _event(r) else "-"),
    Column("TENANT", lambda r: _body(r).get("tenant")),
    Column("REQUEST-ID", lambda r: _event(r).get("request_id")),
    Column("MODEL", lambda r: _body(r).get("model")),
    Column("EVENT-ID", lambda r: _event(r).get("event_id"), wide=True),
    Column("SOURCE", lambda r: _event(r).get("source"), wide=True),
    Column("HASH", lambda r: r.get("hash"), wide=True),
]


@audit_app.command("query")
def audit_query(
    tenant: str = typer.Option("", "--tenant", help="Only this tenant (admin keys: any)."),
    since: str = typer.Option(None, "--since", help="ISO time, or a duration ago: 15m, 2h, 7d."),
    until: str = typer.Option(None, "--until", help="ISO time, or a duration ago."),
    model: str = typer.Option("", "--model", help="Model name or version id."),
    request_id: str = typer.Option("", "--request-id"),
    limit: int = typer.Option(1000, "--limit", help="Most records."),
    output: str = typer.Option(
        "jsonl", "--output", "-o", callback=_query_format, metavar="[jsonl|table|wide|json|yaml]",
        help="jsonl (default): each record exactly as stored, one a line; table/wide: a line "
        "per record; json/yaml: one list of the records."),
    file: pathlib.Path = typer.Option(None, "--file", "-f",
                                      help="Write to this file instead of stdout."),
    auditor: str = typer.Option(None, "--auditor", help="host:port [env INFERMESH_AUDITOR]"),
    api_key: str = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]"),
) -> None:
    """Export matching records, by default as JSON lines exactly as stored (each verifiable on
    its own: its hash, and its Merkle leaf for `prove`)."""
    window = {"since": parse_time(since) if since else None,
              "until": parse_time(until) if until else None}
    with mesh_client("auditor", auditor, api_key, timeout_s=QUERY_TIMEOUT_S) as client:
        records = client.audit.query(tenant=tenant, model=model, request_id=request_id,
                                     limit=limit, **window)
    lines = [record.line for record in records]
    with contextlib.ExitStack() as stack:
        if file is not None:
            sink = stack.enter_context(open(file, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
        if output == "jsonl":
            for line in lines:
                typer.echo(line)
        else:
            emit(OutputFormat(output), [json.loads(line) for line in lines], QUERY_COLUMNS)
    typer.echo(f"{len(lines)} records" + (f" written to {file}" if file else ""), err=True)


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
    async with etcd.connect(endpoint, float(os.environ.get("INFERMESH_ETCD_TIMEOUT_S", 5)),
                            tls_for("etcd", endpoint)) as c:
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
