"""`meshctl registry …`: push, inspect and roll out model versions.

Every command talks to the registry service (`--registry`, `INFERMESH_REGISTRY`, or the local
stack's `stack.json`) with an API key; changes need an admin key. A routing change is a
compare-and-swap on the revision read just before it (or on `--expect-revision`, the one you
saw), so two admins racing cannot both win: the loser gets FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TransferSpeedColumn)

from infermesh.v1 import registry_pb2
from meshctl.config import endpoint_and_key
from services.common import errors
from services.registry.client import RegistryClient, load_push_source
from services.registry.manifest import ALIASES, VERSION_ID, diff_manifests, flatten

T = TypeVar("T")
registry_app = typer.Typer(help="Model versions and their rollouts.", no_args_is_help=True)
REGISTRY = typer.Option(None, "--registry", help="host:port [env INFERMESH_REGISTRY]")
API_KEY = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]")
REASON = typer.Option(..., "--reason", "-m", help="Why; kept in the history and the audit log.")
EXPECT = typer.Option(None, "--expect-revision",
                      help="Fail unless the routing is still at this revision (what you saw).")


def run(registry: str | None, api_key: str | None,
        operation: Callable[[RegistryClient], Awaitable[T]]) -> T:
    """Runs `operation` with a client; on an error prints `CODE: message` and exits 1."""
    endpoint, key = endpoint_and_key("registry", registry, api_key)

    async def call() -> T:
        async with RegistryClient(endpoint, key) as client:
            return await operation(client)

    try:
        return asyncio.run(call())
    except errors.MeshError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _when(stamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def short(version_id: str) -> str:
    return version_id.removeprefix("sha256:")[:12] if version_id else "-"


def manifest_dict(manifest: registry_pb2.ModelManifest) -> dict[str, Any]:
    return json_format.MessageToDict(
        manifest, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


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
               f"(updated {_when(routing.updated_at)} by {routing.updated_by or '-'})")
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
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
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
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Models and what serves them, or one model's versions (oldest first)."""
    if model is None:
        for entry in run(registry, api_key, lambda client: client.models()):
            r = entry.routing
            canary = f"{short(r.canary)}@{r.canary_weight_percent:g}%" if r.canary else "-"
            shadow = f"{short(r.shadow)}@{r.shadow_rate:g}" if r.shadow else "-"
            typer.echo(f"{entry.name:24} rev {r.revision:<4} production {short(r.production):12} "
                       f"canary {canary:18} shadow {shadow:18} versions {entry.version_count}")
        return

    async def operation(client: RegistryClient):
        return await client.routing(model), await client.versions(model)

    routing, versions = run(registry, api_key, operation)
    roles = {routing.production: "production", routing.canary: "canary",
             routing.shadow: "shadow", routing.previous: "previous"}
    for version in versions:
        description = version.manifest.description.splitlines()[0][:60] \
            if version.manifest.description else ""
        typer.echo(f"{version.version_id}  {_when(version.registered_at)}  "
                   f"{roles.get(version.version_id, ''):10}  {description}")


@registry_app.command("show")
def show(
    ref: str = typer.Argument(..., help="model, model@alias, model@sha256:… or a unique prefix"),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest exactly as `push` "
                                 "takes it."),
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """One version: its manifest, id and who registered it when."""
    version = run(registry, api_key, lambda client: resolve_ref(client, ref))
    manifest = manifest_dict(version.manifest)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    typer.echo(f"{version.manifest.name}@{version.version_id}")
    typer.echo(f"registered {_when(version.registered_at)} by {version.registered_by or '-'}")
    typer.echo(f"served as the Triton model {version.triton_model_name}")
    for field, value in flatten(manifest).items():
        typer.echo(f"  {field} = {json.dumps(value)}")


@registry_app.command("diff")
def diff(
    before: str = typer.Argument(..., help="model@version (or alias, or prefix)"),
    after: str = typer.Argument(..., help="model@version, or a version of the same model"),
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Field-by-field differences between two versions; exit 0 either way."""
    if "@" not in after:
        after = f"{before.partition('@')[0]}@{after}"

    async def operation(client: RegistryClient):
        return await resolve_ref(client, before), await resolve_ref(client, after)

    old, new = run(registry, api_key, operation)
    typer.echo(f"--- {old.manifest.name}@{old.version_id}")
    typer.echo(f"+++ {new.manifest.name}@{new.version_id}")
    changes = diff_manifests(manifest_dict(old.manifest), manifest_dict(new.manifest))
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


@registry_app.command("history")
def history(
    model: str, limit: int = typer.Option(20, "--limit", help="Newest this many."),
    before: int = typer.Option(0, "--before", help="Only changes older than this revision."),
    registry: str = REGISTRY, api_key: str = API_KEY,
) -> None:
    """Every routing change: revision, time, actor, action, what it pointed at, and why."""
    page = run(registry, api_key, lambda client: client.history(model, limit, before))
    for entry in page.entries:
        after = entry.after
        detail = {
            "promote": f"production {short(after.production)} (was {short(entry.before.production)})",
            "rollback": f"production {short(after.production)} (was {short(entry.before.production)})",
            "canary": f"canary {short(after.canary)} at {after.canary_weight_percent:g}%",
            "clear_canary": f"canary cleared (was {short(entry.before.canary)})",
            "shadow": f"shadow {short(after.shadow)} at rate {after.shadow_rate:g}",
            "clear_shadow": f"shadow cleared (was {short(entry.before.shadow)})",
        }.get(entry.action, "")
        typer.echo(f"{entry.revision:>4}  {_when(entry.at)}  {entry.actor:28} {entry.action:13} "
                   f"{detail}  — {entry.reason}")
    if page.next_before_revision:
        typer.echo(f"(older: meshctl registry history {model} --before "
                   f"{page.next_before_revision})")


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
