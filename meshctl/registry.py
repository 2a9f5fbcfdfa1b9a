"""`meshctl registry …`: push, inspect and roll out model versions.

Every command talks to the registry service (`--registry`, `INFERMESH_REGISTRY`, or the local
stack's `stack.json`) with an API key; changes need an admin key. A routing change is a
compare-and-swap on the revision read just before it (or on `--expect-revision`, the one you
saw), so two admins racing cannot both win: the loser gets FAILED_PRECONDITION (exit 6).
Reads take `-o table|wide|json|yaml`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from infermesh.v1 import registry_pb2
from meshctl.config import endpoint_and_key, tls_for
from meshctl.exits import fail_error
from meshctl.output import OUTPUT, Column, OutputFormat, emit, is_structured, message_dict
from meshctl.times import format_time
from services.common import errors
from services.registry.client import RegistryClient, load_push_source
from services.registry.manifest import ALIASES, VERSION_ID, diff_manifests, flatten

T = TypeVar("T")
registry_app = typer.Typer(help="Model versions and their rollouts.", no_args_is_help=True)
REGISTRY = typer.Option(None, "--registry", help="host:port [env INFERMESH_REGISTRY]")
API_KEY = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]")
REASON = typer.Option(..., "--reason", "-m", help="Why; kept in the history and the audit log.")
EXPECT = typer.Option(None, "--expected-revision", "--expect-revision",
                      help="Fail (exit 6) unless the routing is still at this revision (what "
                      "you saw).")


def run(registry: str | None, api_key: str | None,
        operation: Callable[[RegistryClient], Awaitable[T]]) -> T:
    """Runs `operation` with a client; on an error prints `CODE: message` and exits with its
    code (`meshctl.exits`)."""
    endpoint, key = endpoint_and_key("registry", registry, api_key)
    mesh_tls = tls_for("registry", registry)

    async def call() -> T:
        async with RegistryClient(endpoint, key, mesh_tls=mesh_tls) as client:
            return await operation(client)

    try:
        return asyncio.run(call())
    except errors.MeshError as exc:
        fail_error(exc)


def short(version_id: str) -> str:
    return version_id.removeprefix("sha256:")[:12] if version_id else "-"


def manifest_dict(manifest: registry_pb2.ModelManifest) -> dict[str, Any]:
    return message_dict(manifest)


async def resolve_version(client: RegistryClient, model: str, text: str) -> str:
    """A full `sha256:…` id, a unique prefix of one (with or without `sha256:`), or an alias."""
    if text in ALIASES or VERSION_ID.match(text):
        return (await client.version(f"{model}@{text}")).version_id
    prefix = text if text.startswith("sha256:") else f"sha256:{text}"
    if len(prefix) < len("sha256:") + 6:
        raise errors.InvalidArgument("VERSION", "give at least 6 hex digits of the version id")
    found = [v.version_id for v in await client.versions(model)
             if v.version_id.startswith(prefix)]
    if len(found) != 1:
        raise errors.NotFound(f"{text} matches {len(found)} versions of {model}, not one")
    return found[0]


async def resolve_ref(client: RegistryClient, ref: str) -> registry_pb2.VersionInfo:
    """`model`, `model@alias`, `model@sha256:…` or `model@<prefix>`."""
    model, _, target = ref.partition("@")
    if target:
        return await client.version(f"{model}@{await resolve_version(client, model, target)}")
    return await client.version(model)


def print_routing(routing: registry_pb2.Routing) -> None:
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

    async def operation(client: RegistryClient) -> registry_pb2.RegisterVersionResponse:
        columns = (TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("upload", total=prepared.total_bytes)
            return await client.push(prepared, lambda sent: bar.advance(task, sent))

    reply = run(registry, api_key, operation)
    state = "registered" if reply.created else "already registered (unchanged)"
    typer.echo(f"{prepared.manifest.name}@{reply.version_id}  {state}")


@registry_app.command("list")
def list_models(
    model: str = typer.Argument(None, help="Show this model's versions instead."),
    output: OutputFormat = OUTPUT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Models and what serves them, or one model's versions (oldest first)."""
    if model is None:
        models = [message_dict(entry)
                  for entry in run(registry, api_key, lambda client: client.models())]

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

    async def operation(client: RegistryClient):
        return await client.routing(model), await client.versions(model)

    routing, versions = run(registry, api_key, operation)
    roles = {routing.production: "production", routing.canary: "canary",
             routing.shadow: "shadow", routing.previous: "previous"}
    rows = [{**message_dict(v), "role": roles.get(v.version_id, "")} for v in versions]
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
    version = run(registry, api_key, lambda client: resolve_ref(client, ref))
    manifest = manifest_dict(version.manifest)
    if manifest_only:
        typer.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    if is_structured(output):
        emit(output, message_dict(version), [])
        return
    typer.echo(f"{version.manifest.name}@{version.version_id}")
    typer.echo(f"registered {format_time(version.registered_at)} by "
               f"{version.registered_by or '-'}")
    typer.echo(f"served as the Triton model {version.triton_model_name}")
    for field, value in flatten(manifest).items():
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

    async def operation(client: RegistryClient):
        return await resolve_ref(client, before), await resolve_ref(client, after)

    old, new = run(registry, api_key, operation)
    changes = diff_manifests(manifest_dict(old.manifest), manifest_dict(new.manifest))
    if is_structured(output):
        emit(output, {"before": f"{old.manifest.name}@{old.version_id}",
                      "after": f"{new.manifest.name}@{new.version_id}",
                      "changes": [{"field": f, "before": was, "after": now}
                                  for f, was, now in changes]}, [])
        return
    typer.echo(f"--- {old.manifest.name}@{old.version_id}")
    typer.echo(f"+++ {new.manifest.name}@{new.version_id}")
    for field, was, now in changes:
        typer.echo(f"  {field}: {json.dumps(was)} → {json.dumps(now)}")
    if not changes:
        typer.echo("  (identical)")


def change(registry: str | None, api_key: str | None, model: str, reason: str,
           expect: int | None, version: str | None = None, **fields: Any) -> None:
    """One routing change, printed as the routing it left."""

    async def operation(client: RegistryClient) -> registry_pb2.ChangeRoutingResponse:
        if version is not None:
            version_id = await resolve_version(client, model, version)
            for message in fields.values():
                message.version_id = version_id
        return await client.change(model, reason, expect, **fields)

    reply = run(registry, api_key, operation)
    typer.echo(f"{reply.entry.action}: revision {reply.entry.revision - 1} → "
               f"{reply.entry.revision}")
    print_routing(reply.routing)


@registry_app.command("promote")
def promote(
    model: str, version: str = typer.Argument(..., help="sha256:…, a unique prefix, or canary"),
    reason: str = REASON, expect: int = EXPECT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Make VERSION production; the old production becomes `previous` (rollback target)."""
    change(registry, api_key, model, reason, expect, version, promote=registry_pb2.Promote())


def set_or_clear(
    registry: str | None, api_key: str | None, first: str, second: str, reason: str,
    expect: int | None, clear: dict[str, Any], setting: dict[str, Any] | None, option: str,
) -> None:
    """`<cmd> clear MODEL` makes the `clear` change; `<cmd> MODEL VERSION <option> V` makes
    `setting` (None when the option was not given)."""
    if first == "clear":
        change(registry, api_key, second, reason, expect, **clear)
        return
    if setting is None:
        raise typer.BadParameter(f"{option} is required")
    change(registry, api_key, first, reason, expect, second, **setting)


@registry_app.command("canary")
def canary(
    model: str = typer.Argument(..., help="the model, or `clear` followed by the model"),
    version: str = typer.Argument(..., help="the version (or, after `clear`, the model)"),
    weight: float = typer.Option(None, "--weight", help="Percent of tenants/users, (0, 100]."),
    reason: str = REASON, expect: int = EXPECT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """`canary MODEL VERSION --weight N` sends a sticky N% to VERSION; `canary clear MODEL`."""
    set_or_clear(registry, api_key, model, version, reason, expect,
                 {"clear_canary": registry_pb2.ClearCanary()},
                 None if weight is None else {
                     "canary": registry_pb2.SetCanary(weight_percent=weight)}, "--weight")


@registry_app.command("shadow")
def shadow(
    model: str = typer.Argument(..., help="the model, or `clear` followed by the model"),
    version: str = typer.Argument(..., help="the version (or, after `clear`, the model)"),
    rate: float = typer.Option(None, "--rate", help="Share of requests copied, (0, 1]."),
    reason: str = REASON, expect: int = EXPECT, registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """`shadow MODEL VERSION --rate R` copies a share R of requests to VERSION (its output is
    discarded, never billed); `shadow clear MODEL`."""
    set_or_clear(registry, api_key, model, version, reason, expect,
                 {"clear_shadow": registry_pb2.ClearShadow()},
                 None if rate is None else {"shadow": registry_pb2.SetShadow(rate=rate)},
                 "--rate")


@registry_app.command("rollback")
def rollback(
    model: str, reason: str = REASON, expect: int = EXPECT,
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Swap production and previous (a second rollback undoes the first)."""
    change(registry, api_key, model, reason, expect, rollback=registry_pb2.Rollback())


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
    page = run(registry, api_key, lambda client: client.history(model, limit, before))
    older = (f"(older: meshctl registry history {model} --before {page.next_before_revision})"
             if page.next_before_revision else "")
    if is_structured(output):
        emit(output, message_dict(page), [])
        return
    emit(output, [message_dict(entry) for entry in page.entries], [
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
    reply = run(registry, api_key,
                lambda client: client.collect_garbage(grace_hours * 3600, dry_run, reason))
    verb = "would delete" if dry_run else "deleted"
    for digest in reply.deleted:
        typer.echo(f"{verb} {digest}")
    typer.echo(f"{verb} {len(reply.deleted)} blobs and {reply.abandoned_uploads} abandoned "
               f"uploads ({reply.freed_bytes} bytes); kept {reply.kept}")
