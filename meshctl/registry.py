"""`meshctl registry …`: push, inspect and roll out model versions.

Every command talks to the registry service (`--registry`, `INFERMESH_REGISTRY`, or the local
stack's `stack.json`) with an API key; changes need an admin key. A routing change is a
compare-and-swap on the revision read just before it (or on `--expect-revision`, the one you
saw), so two admins racing cannot both win: the loser gets FAILED_PRECONDITION (exit 6).
Reads take `-o table|wide|json|yaml`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer
from infermesh_client import Client, LocalBlob, Routing, RoutingChange
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from infermesh.v1 import registry_pb2
from meshctl.client import mesh_client
from meshctl.exits import fail_error
from meshctl.output import OUTPUT, Column, OutputFormat, emit, is_structured, message_dict
from meshctl.times import format_time
from services.common import errors
from services.registry.client import load_push_source
from services.registry.manifest import diff_manifests, flatten

registry_app = typer.Typer(help="Model versions and their rollouts.", no_args_is_help=True)
REGISTRY = typer.Option(None, "--registry", help="host:port [env INFERMESH_REGISTRY]")
API_KEY = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]")
REASON = typer.Option(..., "--reason", "-m", help="Why; kept in the history and the audit log.")
EXPECT = typer.Option(None, "--expected-revision", "--expect-revision",
                      help="Fail (exit 6) unless the routing is still at this revision (what "
                      "you saw).")


def short(version_id: str) -> str:
    return version_id.removeprefix("sha256:")[:12] if version_id else "-"


def manifest_dict(manifest: registry_pb2.ModelManifest) -> dict[str, Any]:
    return message_dict(manifest)


def print_routing(routing: Routing) -> None:
    typer.echo(f"{routing.model}  revision {routing.revision}  "
               f"(updated {format_time(routing.updated_at)} by {routing.updated_by or '-'})")
    typer.echo(f"  production  {routing.production or '-'}")
    if routing.canary:
        typer.echo(f"  canary      {routing.canary}  {routing.canary_weight_percent:g}%")
    if routing.shadow:
        typer.echo(f"  shadow      {routing.shadow}  rate {routing.shadow_rate:g}")
    typer.echo(f"  previous    {routing.previous or '-'}")


@registry_app.command("push")
def push(
    source: str = typer.Argument(..., help="A Hugging Face model directory, a .gguf file, a "
                                 "model directory with manifest.json, a manifest file, or - for "
                                 "stdin"),
    name: str = typer.Option(None, "--name", help="The model's name when its manifest is "
                             "derived (default: the directory's or file's name, lowercased)."),
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Upload the files a manifest pins (what the registry lacks, resuming) and register it.

    Without a manifest.json, the manifest is derived from the model's own files and printed
    (JSON, on stdout) before it is registered; a model the torch engine could not serve is
    refused before anything is uploaded. Progress goes to stderr."""
    try:
        prepared = load_push_source(source, name)
    except errors.MeshError as exc:
        fail_error(exc)
    if prepared.derived:
        typer.echo(json.dumps(manifest_dict(prepared.manifest), indent=2, sort_keys=True))

    files = [LocalBlob(str(f.path), f.digest, f.size) for f in prepared.files]
    columns = (TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with (mesh_client("registry", registry, api_key) as client,
          Progress(*columns, console=Console(stderr=True), transient=True) as bar):
        task = bar.add_task("upload", total=prepared.total_bytes)
        reply = client.registry.push(manifest_dict(prepared.manifest), files,
                                     progress=lambda sent: bar.advance(task, sent))
    state = "registered" if reply.created else "already registered (unchanged)"
    typer.echo(f"{prepared.manifest.name}@{reply.version_id}  {state}")


@registry_app.command("list")
def list_models(
    model: str = typer.Argument(None, help="Show this model's versions instead."),
    output: OutputFormat = OUTPUT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Models and what serves them, or one model's versions (oldest first)."""
    if model is None:
        with mesh_client("registry", registry, api_key) as client:
            models = [entry.to_dict() for entry in client.registry.models()]

        def canary(m: dict) -> str:
            r = m["routing"]
            return f"{short(r['canary'])}@{r['canary_weight_percent']:g}%" if r["canary"] else ""

        def shadow(m: dict) -> str:
            r = m["routing"]
            return f"{short(r['shadow'])}@{r['shadow_rate']:g}" if r["shadow"] else ""

        emit(output, models, [
            Column("MODEL", lambda m: m["name"]),
            Column("REVISION", lambda m: m["routing"]["revision"], right=True),
            Column("PRODUCTION", lambda m: short(m["routing"]["production"])),
            Column("CANARY", canary), Column("SHADOW", shadow),
            Column("VERSIONS", lambda m: m["version_count"], right=True),
            Column("PREVIOUS", lambda m: short(m["routing"]["previous"]), wide=True),
            Column("UPDATED", lambda m: format_time(m["routing"].get("updated_at")), wide=True),
            Column("UPDATED-BY", lambda m: m["routing"]["updated_by"], wide=True),
        ])
        return

    with mesh_client("registry", registry, api_key) as client:
        routing, versions = client.registry.routing(model), client.registry.versions(model)
    roles = {routing.production: "production", routing.canary: "canary",
             routing.shadow: "shadow", routing.previous: "previous"}
    rows = [{**v.to_dict(), "role": roles.get(v.version_id, "")} for v in versions]
    emit(output, rows, [
        Column("VERSION", lambda v: v["version_id"]),
        Column("REGISTERED", lambda v: format_time(v.get("registered_at"))),
        Column("ROLE", lambda v: v["role"]),
        Column("DESCRIPTION",
               lambda v: (v["manifest"]["description"].splitlines() or [""])[0][:60]),
        Column("REGISTERED-BY", lambda v: v["registered_by"], wide=True),
        Column("TRITON-MODEL", lambda v: v["triton_model_name"], wide=True),
    ])


@registry_app.command("show")
def show(
    ref: str = typer.Argument(..., help="model, model@alias, model@sha256:… or a unique prefix"),
    manifest_only: bool = typer.Option(False, "--manifest", "--json",
                                       help="Print the manifest exactly as `push` takes it "
                                       "(JSON; --json is the older name)."),
    output: OutputFormat = OUTPUT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """One version: its manifest, id and who registered it when (table: a header line, then
    every manifest field)."""
    with mesh_client("registry", registry, api_key) as client:
        version = client.registry.version(ref)
    data = version.to_dict()
    if manifest_only:
        typer.echo(json.dumps(data["manifest"], indent=2, sort_keys=True))
        return
    if is_structured(output):
        emit(output, data, [])
        return
    typer.echo(f"{version.model}@{version.version_id}")
    typer.echo(f"registered {format_time(version.registered_at)} by "
               f"{version.registered_by or '-'}")
    typer.echo(f"served as the Triton model {version.triton_model_name}")
    for field, value in flatten(data["manifest"]).items():
        typer.echo(f"  {field} = {json.dumps(value)}")


@registry_app.command("diff")
def diff(
    before: str = typer.Argument(..., help="model@version (or alias, or prefix)"),
    after: str = typer.Argument(..., help="model@version, or a version of the same model"),
    output: OutputFormat = OUTPUT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Field-by-field differences between two versions; exit 0 either way."""
    if "@" not in after:
        after = f"{before.partition('@')[0]}@{after}"

    with mesh_client("registry", registry, api_key) as client:
        old, new = client.registry.version(before), client.registry.version(after)
    changes = diff_manifests(old.to_dict()["manifest"], new.to_dict()["manifest"])
    if is_structured(output):
        emit(output, {"before": f"{old.model}@{old.version_id}",
                      "after": f"{new.model}@{new.version_id}",
                      "changes": [{"field": f, "before": was, "after": now}
                                  for f, was, now in changes]}, [])
        return
    typer.echo(f"--- {old.model}@{old.version_id}")
    typer.echo(f"+++ {new.model}@{new.version_id}")
    for field, was, now in changes:
        typer.echo(f"  {field}: {json.dumps(was)} → {json.dumps(now)}")
    if not changes:
        typer.echo("  (identical)")


def change(registry: str | None, api_key: str | None,
           make: Callable[[Client], RoutingChange]) -> None:
    """One routing change (`make` makes it with the SDK's client), printed as the routing it
    left."""
    with mesh_client("registry", registry, api_key) as client:
        changed = make(client)
    typer.echo(f"{changed.entry.action}: revision {changed.entry.revision - 1} → "
               f"{changed.entry.revision}")
    print_routing(changed.routing)


@registry_app.command("promote")
def promote(
    model: str, version: str = typer.Argument(..., help="sha256:…, a unique prefix, or canary"),
    reason: str = REASON, expect: int = EXPECT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Make VERSION production; the old production becomes `previous` (rollback target)."""
    change(registry, api_key,
           lambda c: c.registry.promote(model, version, reason=reason, expected_revision=expect))


def _required(value: float | None, option: str) -> float:
    if value is None:
        raise typer.BadParameter(f"{option} is required")
    return value


@registry_app.command("canary")
def canary(
    model: str = typer.Argument(..., help="the model, or `clear` followed by the model"),
    version: str = typer.Argument(..., help="the version (or, after `clear`, the model)"),
    weight: float = typer.Option(None, "--weight", help="Percent of tenants/users, (0, 100]."),
    reason: str = REASON, expect: int = EXPECT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """`canary MODEL VERSION --weight N` sends a sticky N% to VERSION; `canary clear MODEL`."""
    if model == "clear":  # `canary clear MODEL`: the model is the second argument
        change(registry, api_key,
               lambda c: c.registry.clear_canary(version, reason=reason, expected_revision=expect))
        return
    weight = _required(weight, "--weight")
    change(registry, api_key,
           lambda c: c.registry.canary(model, version, weight, reason=reason,
                                       expected_revision=expect))


@registry_app.command("shadow")
def shadow(
    model: str = typer.Argument(..., help="the model, or `clear` followed by the model"),
    version: str = typer.Argument(..., help="the version (or, after `clear`, the model)"),
    rate: float = typer.Option(None, "--rate", help="Share of requests copied, (0, 1]."),
    reason: str = REASON, expect: int = EXPECT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """`shadow MODEL VERSION --rate R` copies a share R of requests to VERSION (its output is
    discarded, never billed); `shadow clear MODEL`."""
    if model == "clear":
        change(registry, api_key,
               lambda c: c.registry.clear_shadow(version, reason=reason, expected_revision=expect))
        return
    rate = _required(rate, "--rate")
    change(registry, api_key,
           lambda c: c.registry.shadow(model, version, rate, reason=reason,
                                       expected_revision=expect))


@registry_app.command("rollback")
def rollback(
    model: str, reason: str = REASON, expect: int = EXPECT,
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Swap production and previous (a second rollback undoes the first)."""
    change(registry, api_key,
           lambda c: c.registry.rollback(model, reason=reason, expected_revision=expect))


def _detail(entry: dict[str, Any]) -> str:
    """What a routing change pointed at, from a history entry's dict."""
    before, after = entry.get("before") or {}, entry.get("after") or {}
    was, now = (lambda field: short(before.get(field, ""))), (lambda f: short(after.get(f, "")))
    return {
        "promote": f"production {now('production')} (was {was('production')})",
        "rollback": f"production {now('production')} (was {was('production')})",
        "canary": f"canary {now('canary')} at {after.get('canary_weight_percent', 0):g}%",
        "clear_canary": f"canary cleared (was {was('canary')})",
        "shadow": f"shadow {now('shadow')} at rate {after.get('shadow_rate', 0):g}",
        "clear_shadow": f"shadow cleared (was {was('shadow')})",
    }.get(entry["action"], "")


@registry_app.command("history")
def history(
    model: str, limit: int = typer.Option(20, "--limit", help="Newest this many."),
    before: int = typer.Option(0, "--before", help="Only changes older than this revision."),
    output: OutputFormat = OUTPUT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Every routing change: revision, time, actor, action, what it pointed at, and why."""
    with mesh_client("registry", registry, api_key) as client:
        page = client.registry.history(model, limit=limit, before_revision=before)
    older = (f"(older: meshctl registry history {model} --before {page.next_before_revision})"
             if page.next_before_revision else "")
    if is_structured(output):
        emit(output, page.to_dict(), [])
        return
    emit(output, [entry.to_dict() for entry in page.entries], [
        Column("REVISION", lambda e: e["revision"], right=True),
        Column("AT", lambda e: format_time(e.get("at"))),
        Column("ACTOR", lambda e: e["actor"]),
        Column("ACTION", lambda e: e["action"]),
        Column("DETAIL", _detail),
        Column("REASON", lambda e: e["reason"]),
    ], after=older)


@registry_app.command("gc")
def gc(
    grace_hours: float = typer.Option(24.0, "--grace-hours",
                                      help="Spare blobs and uploads younger than this."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; delete nothing."),
    reason: str = typer.Option("", "--reason", "-m",
                               help="Why (required unless --dry-run); kept in the audit log."),
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Delete blobs no registered version pins, and abandoned uploads (versions are never
    deleted, so this frees what failed or abandoned pushes left)."""
    with mesh_client("registry", registry, api_key) as client:
        reply = client.registry.collect_garbage(reason=reason, grace_seconds=grace_hours * 3600,
                                                dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for digest in reply.deleted:
        typer.echo(f"{verb} {digest}")
    typer.echo(f"{verb} {len(reply.deleted)} blobs and {reply.abandoned_uploads} abandoned "
               f"uploads ({reply.freed_bytes} bytes); kept {reply.kept}")
