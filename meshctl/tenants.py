"""`meshctl tenant …` and `meshctl key …`: tenants, plans and API keys (admin key required).
Reads (`tenant show|list`, `key list`) take `-o table|wide|json|yaml`; changes print the tenant
as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
from typing import Any

import infermesh_client
import typer
from infermesh_client import PlanChange

from meshctl.client import TIMEOUT_S, mesh_client
from meshctl.config import tls_for
from meshctl.exits import fail_error
from meshctl.output import OUTPUT, Column, OutputFormat, emit, to_json
from meshctl.times import format_time, parse_time
from services.common import errors, etcd
from services.common.tenancy import ApiKey, Tenant, TenantStore

tenant_app = typer.Typer(help="Tenants and their plans.", no_args_is_help=True)
key_app = typer.Typer(help="API keys (shown once when issued; only a hash is stored).",
                      no_args_is_help=True)

GATEWAY = typer.Option(None, "--gateway", help="host:port [env INFERMESH_GATEWAY]")
API_KEY = typer.Option(None, "--api-key", help="an admin key [env INFERMESH_API_KEY]")


class Priority(enum.StrEnum):
    premium = "premium"
    standard = "standard"
    free = "free"
    batch = "batch"


class Role(enum.StrEnum):
    user = "user"
    admin = "admin"


def plan_update(
    priority: Priority | str | None, rpm: int | None, input_tpm: int | None, output_tpm: int | None,
    max_concurrency: int | None, max_context: int | None, max_output: int | None,
    monthly_tokens: int | None, degraded_max_tokens: int | None,
    audit_text_hashes: bool | None = None, models: str | None = None,
    version_grants: str | None = None, isolate_prefix_cache: bool | None = None,
    response_cache: bool | None = None,
) -> PlanChange:
    """The plan fields the flags give (None: not given, the field stays)."""

    def listed(text: str | None) -> tuple[str, ...] | None:  # "" sets an empty list
        if text is None:
            return None
        return tuple(v.strip() for v in text.split(",") if v.strip())

    return PlanChange(
        priority=priority.value if isinstance(priority, Priority) else priority,
        requests_per_minute=rpm, input_tokens_per_minute=input_tpm,
        output_tokens_per_minute=output_tpm, max_concurrency=max_concurrency,
        max_context_tokens=max_context, max_output_tokens=max_output,
        monthly_token_budget=monthly_tokens, degraded_max_tokens=degraded_max_tokens,
        audit_text_hashes=audit_text_hashes, models=listed(models),
        version_grants=listed(version_grants), isolate_prefix_cache=isolate_prefix_cache,
        response_cache=response_cache)


def show(tenant: infermesh_client.Tenant) -> None:
    """What a change left, as JSON (the tenant as `tenant show -o json` prints it)."""
    typer.echo(to_json(tenant.to_dict()))


def parse_expiry(text: str | None) -> datetime.datetime | None:
    """`30d`, `12h`, … from now, or an ISO-8601 time (UTC unless it says so); None: never."""
    if not text:
        return None
    return parse_time(text, future=True)


def _plan(field: str) -> Any:
    return lambda tenant: tenant["plan"].get(field)


TENANT_COLUMNS = [
    Column("TENANT", lambda t: t["tenant_id"]),
    Column("PRIORITY", _plan("priority")),
    Column("RPM", _plan("requests_per_minute"), right=True),
    Column("INPUT-TPM", _plan("input_tokens_per_minute"), right=True),
    Column("OUTPUT-TPM", _plan("output_tokens_per_minute"), right=True),
    Column("CONCURRENCY", _plan("max_concurrency"), right=True),
    Column("BUDGET", _plan("monthly_token_budget"), right=True),
    Column("USED", lambda t: t["tokens_used"], right=True),
    Column("REVISION", lambda t: t["revision"], right=True),
    Column("NAME", lambda t: t["name"], wide=True),
    Column("MAX-CONTEXT", _plan("max_context_tokens"), wide=True, right=True),
    Column("MAX-OUTPUT", _plan("max_output_tokens"), wide=True, right=True),
    Column("DEGRADED-MAX", _plan("degraded_max_tokens"), wide=True, right=True),
    Column("MODELS", lambda t: ",".join(t["plan"].get("models", [])) or "*", wide=True),
    Column("MONTH", lambda t: t["month"], wide=True),
]


PRIORITY = typer.Option(None, "--priority", case_sensitive=False)
RPM = typer.Option(None, "--rpm", help="requests per minute")
INPUT_TPM = typer.Option(None, "--input-tpm", help="input tokens per minute")
OUTPUT_TPM = typer.Option(None, "--output-tpm", help="output tokens per minute")
MAX_CONCURRENCY = typer.Option(None, "--max-concurrency")
MAX_CONTEXT = typer.Option(None, "--max-context", help="prompt + output tokens")
MAX_OUTPUT = typer.Option(None, "--max-output", help="output tokens per request")
MONTHLY = typer.Option(None, "--monthly-tokens", help="monthly token budget; 0 = none")
DEGRADED = typer.Option(None, "--degraded-max-tokens",
                        help="under pressure, cap max_tokens to this before refusing; 0 = off")
TEXT_HASHES = typer.Option(None, "--audit-text-hashes/--no-audit-text-hashes",
                           help="audit events carry sha256 of the prompt and completion")
RESPONSE_CACHE = typer.Option(
    None, "--response-cache/--no-response-cache",
    help="deterministic requests repeated within the gateway's TTL are answered from the first "
    "answer, free")
ISOLATE_PREFIX = typer.Option(
    None, "--isolate-prefix-cache/--share-prefix-cache",
    help="its prompts share no prefix routing affinity or engine prefix cache with other tenants")
MODELS = typer.Option(None, "--models",
                      help="comma-separated model names the tenant may use; '' = every model")
VERSION_GRANTS = typer.Option(
    None, "--version-grants",
    help="comma-separated version ids (sha256:…) it may pin though no production, canary or "
    "previous alias names them; '' = none")


@tenant_app.command("create")
def tenant_create(
    tenant_id: str, name: str = typer.Option(None, "--name"),
    priority: Priority = PRIORITY, rpm: int = RPM, input_tpm: int = INPUT_TPM,
    output_tpm: int = OUTPUT_TPM, max_concurrency: int = MAX_CONCURRENCY,
    max_context: int = MAX_CONTEXT, max_output: int = MAX_OUTPUT, monthly_tokens: int = MONTHLY,
    degraded_max_tokens: int = DEGRADED, audit_text_hashes: bool = TEXT_HASHES,
    models: str = MODELS, version_grants: str = VERSION_GRANTS,
    isolate_prefix_cache: bool = ISOLATE_PREFIX, response_cache: bool = RESPONSE_CACHE,
    gateway: str = GATEWAY, api_key: str = API_KEY,
) -> None:
    """Create a tenant; unset plan fields take the defaults."""
    plan = plan_update(priority, rpm, input_tpm, output_tpm, max_concurrency, max_context,
                       max_output, monthly_tokens, degraded_max_tokens, audit_text_hashes,
                       models, version_grants, isolate_prefix_cache, response_cache)
    with mesh_client("gateway", gateway, api_key) as client:
        show(client.admin.tenants.create(tenant_id, name=name or "", plan=plan))


@tenant_app.command("update")
def tenant_update(
    tenant_id: str, name: str = typer.Option(None, "--name"),
    priority: Priority = PRIORITY, rpm: int = RPM, input_tpm: int = INPUT_TPM,
    output_tpm: int = OUTPUT_TPM, max_concurrency: int = MAX_CONCURRENCY,
    max_context: int = MAX_CONTEXT, max_output: int = MAX_OUTPUT, monthly_tokens: int = MONTHLY,
    degraded_max_tokens: int = DEGRADED, audit_text_hashes: bool = TEXT_HASHES,
    models: str = MODELS, version_grants: str = VERSION_GRANTS,
    isolate_prefix_cache: bool = ISOLATE_PREFIX, response_cache: bool = RESPONSE_CACHE,
    expected_revision: int = typer.Option(0, "--expected-revision",
                                          help="refuse if the tenant changed since (from show)"),
    gateway: str = GATEWAY, api_key: str = API_KEY,
) -> None:
    """Change the plan fields given; the others stay."""
    plan = plan_update(priority, rpm, input_tpm, output_tpm, max_concurrency, max_context,
                       max_output, monthly_tokens, degraded_max_tokens, audit_text_hashes,
                       models, version_grants, isolate_prefix_cache, response_cache)
    with mesh_client("gateway", gateway, api_key) as client:
        show(client.admin.tenants.update(tenant_id, name=name, plan=plan,
                                         expected_revision=expected_revision))


@tenant_app.command("show")
def tenant_show(tenant_id: str, output: OutputFormat = OUTPUT, gateway: str = GATEWAY,
                api_key: str = API_KEY) -> None:
    """The plan, its revision and this month's usage."""
    with mesh_client("gateway", gateway, api_key) as client:
        data = client.admin.tenants.get(tenant_id).to_dict()
    emit(output, data, TENANT_COLUMNS, rows=[data])


@tenant_app.command("list")
def tenant_list(output: OutputFormat = OUTPUT, gateway: str = GATEWAY,
                api_key: str = API_KEY) -> None:
    """Every tenant: its plan, this month's usage and revision."""
    with mesh_client("gateway", gateway, api_key) as client:
        tenants = client.admin.tenants.list()
    emit(output, [tenant.to_dict() for tenant in tenants], TENANT_COLUMNS)


@key_app.command("issue")
def key_issue(
    tenant_id: str, role: Role = typer.Option(Role.user, "--role", case_sensitive=False),
    expires: str = typer.Option(None, "--expires",
                                help="A duration from now (30d, 12h) or an ISO time."),
    gateway: str = GATEWAY, api_key: str = API_KEY,
) -> None:
    """Print a new key once (only its hash is stored)."""
    expires_at = parse_expiry(expires)
    with mesh_client("gateway", gateway, api_key) as client:
        issued = client.admin.keys.issue(tenant_id, role=role.value, expires_at=expires_at)
    key = issued.key
    typer.echo(issued.api_key)
    typer.echo(f"key_id={key.key_id} tenant={key.tenant_id} role={key.role}"
               + (f" expires_at={format_time(key.expires_at)}" if key.expires_at else ""),
               err=True)


@key_app.command("revoke")
def key_revoke(key_id: str, gateway: str = GATEWAY, api_key: str = API_KEY) -> None:
    with mesh_client("gateway", gateway, api_key) as client:
        revoked = client.admin.keys.revoke(key_id)
    typer.echo(f"revoked {revoked.key_id} (tenant {revoked.tenant_id})")


@key_app.command("list")
def key_list(tenant_id: str = typer.Argument("", help="Only this tenant's keys."),
             output: OutputFormat = OUTPUT, gateway: str = GATEWAY,
             api_key: str = API_KEY) -> None:
    """Keys (never the keys themselves): id, tenant, role, when issued and when they expire."""
    with mesh_client("gateway", gateway, api_key) as client:
        keys = client.admin.keys.list(tenant_id)
    emit(output, [key.to_dict() for key in keys], [
        Column("KEY-ID", lambda k: k["key_id"]), Column("TENANT", lambda k: k["tenant_id"]),
        Column("ROLE", lambda k: k["role"]),
        Column("EXPIRES", lambda k: format_time(k["expire_time"]) if "expire_time" in k
               else "never"),
        Column("CREATED", lambda k: format_time(k.get("create_time")), wide=True),
    ])


@key_app.command("bootstrap")
def key_bootstrap(
    tenant_id: str = typer.Argument("operators", help="The tenant the first admin key belongs to."),
    etcd_endpoint: str = typer.Option(..., "--etcd", envvar="INFERMESH_ETCD",
                                      help="host:port of etcd (operators only: no API key yet)"),
) -> None:
    """Create the first admin key (and its tenant, if missing) directly in etcd: the admin API
    needs an admin key, so a new cluster starts here."""

    async def bootstrap() -> tuple[str, ApiKey]:
        async with etcd.connect(etcd_endpoint, TIMEOUT_S,
                                tls_for("etcd", etcd_endpoint)) as client:
            store = TenantStore(client)
            with contextlib.suppress(errors.FailedPrecondition):  # it exists: keep its plan
                await store.create_tenant(Tenant(tenant_id, tenant_id))
            return await store.issue_key(tenant_id, role="admin")

    try:
        clear, key = asyncio.run(bootstrap())
    except errors.MeshError as exc:
        fail_error(exc)
    typer.echo(clear)
    typer.echo(f"key_id={key.key_id} tenant={key.tenant_id} role=admin", err=True)
