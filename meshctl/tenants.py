"""`meshctl tenant …` and `meshctl key …`: tenants, plans and API keys (admin key required)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re

import typer
from google.protobuf import json_format

from infermesh.v1 import tenants_pb2, tenants_pb2_grpc
from meshctl.rpc import TIMEOUT_S, call_gateway
from services.common import errors, etcd
from services.common.tenancy import ApiKey, Tenant, TenantStore

tenant_app = typer.Typer(help="Tenants and their plans.", no_args_is_help=True)
key_app = typer.Typer(help="API keys (shown once when issued; only a hash is stored).",
                      no_args_is_help=True)

GATEWAY = typer.Option(None, "--gateway", help="host:port [env INFERMESH_GATEWAY]")
API_KEY = typer.Option(None, "--api-key", help="an admin key [env INFERMESH_API_KEY]")
DURATION = re.compile(r"^(\d+)([smhdw])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def plan_update(
    priority: str | None, rpm: int | None, input_tpm: int | None, output_tpm: int | None,
    max_concurrency: int | None, max_context: int | None, max_output: int | None,
    monthly_tokens: int | None, degraded_max_tokens: int | None,
    audit_text_hashes: bool | None = None, models: str | None = None,
    version_grants: str | None = None,
) -> tenants_pb2.PlanUpdate:
    values = {
        "priority": priority, "requests_per_minute": rpm, "input_tokens_per_minute": input_tpm,
        "output_tokens_per_minute": output_tpm, "max_concurrency": max_concurrency,
        "max_context_tokens": max_context, "max_output_tokens": max_output,
        "monthly_token_budget": monthly_tokens, "degraded_max_tokens": degraded_max_tokens,
        "audit_text_hashes": audit_text_hashes,
    }
    update = tenants_pb2.PlanUpdate(**{k: v for k, v in values.items() if v is not None})
    for name, text in (("models", models), ("version_grants", version_grants)):
        if text is not None:  # "" sets an empty list
            getattr(update, name).values.extend(v.strip() for v in text.split(",") if v.strip())
    return update


def show(message) -> None:
    typer.echo(json.dumps(json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
        indent=2))


def parse_expiry(text: str | None) -> float:
    """`30d`, `12h`, … from now, or an ISO-8601 date/time (UTC unless it says otherwise)."""
    if not text:
        return 0.0
    match = DURATION.match(text)
    now = datetime.datetime.now(datetime.UTC)
    if match:
        return now.timestamp() + int(match.group(1)) * UNIT_S[match.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter("use a duration like 30d/12h or an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


PRIORITY = typer.Option(None, "--priority", help="premium | standard | free | batch")
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
MODELS = typer.Option(None, "--models",
                      help="comma-separated model names the tenant may use; '' = every model")
VERSION_GRANTS = typer.Option(
    None, "--version-grants",
    help="comma-separated version ids (sha256:…) it may pin though no production, canary or "
    "previous alias names them; '' = none")


@tenant_app.command("create")
def tenant_create(
    tenant_id: str, name: str = typer.Option(None, "--name"),
    priority: str = PRIORITY, rpm: int = RPM, input_tpm: int = INPUT_TPM,
    output_tpm: int = OUTPUT_TPM, max_concurrency: int = MAX_CONCURRENCY,
    max_context: int = MAX_CONTEXT, max_output: int = MAX_OUTPUT, monthly_tokens: int = MONTHLY,
    degraded_max_tokens: int = DEGRADED, audit_text_hashes: bool = TEXT_HASHES,
    models: str = MODELS, version_grants: str = VERSION_GRANTS,
    gateway: str = GATEWAY, api_key: str = API_KEY,
) -> None:
    """Create a tenant; unset plan fields take the defaults."""
    request = tenants_pb2.CreateTenantRequest(
        tenant_id=tenant_id, name=name or "",
        plan=plan_update(priority, rpm, input_tpm, output_tpm, max_concurrency, max_context,
                         max_output, monthly_tokens, degraded_max_tokens, audit_text_hashes,
                         models, version_grants))
    show(call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                      .CreateTenant(request, metadata=md, timeout=TIMEOUT_S)))


@tenant_app.command("update")
def tenant_update(
    tenant_id: str, name: str = typer.Option(None, "--name"),
    priority: str = PRIORITY, rpm: int = RPM, input_tpm: int = INPUT_TPM,
    output_tpm: int = OUTPUT_TPM, max_concurrency: int = MAX_CONCURRENCY,
    max_context: int = MAX_CONTEXT, max_output: int = MAX_OUTPUT, monthly_tokens: int = MONTHLY,
    degraded_max_tokens: int = DEGRADED, audit_text_hashes: bool = TEXT_HASHES,
    models: str = MODELS, version_grants: str = VERSION_GRANTS,
    expected_revision: int = typer.Option(0, "--expected-revision",
                                          help="refuse if the tenant changed since (from show)"),
    gateway: str = GATEWAY, api_key: str = API_KEY,
) -> None:
    """Change the plan fields given; the others stay."""
    request = tenants_pb2.UpdateTenantRequest(
        tenant_id=tenant_id, expected_revision=expected_revision,
        plan=plan_update(priority, rpm, input_tpm, output_tpm, max_concurrency, max_context,
                         max_output, monthly_tokens, degraded_max_tokens, audit_text_hashes,
                         models, version_grants))
    if name is not None:
        request.name = name
    show(call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                      .UpdateTenant(request, metadata=md, timeout=TIMEOUT_S)))


@tenant_app.command("show")
def tenant_show(tenant_id: str, gateway: str = GATEWAY, api_key: str = API_KEY) -> None:
    """The plan, its revision and this month's usage."""
    request = tenants_pb2.GetTenantRequest(tenant_id=tenant_id)
    show(call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                      .GetTenant(request, metadata=md, timeout=TIMEOUT_S)))


@tenant_app.command("list")
def tenant_list(gateway: str = GATEWAY, api_key: str = API_KEY) -> None:
    reply = call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                         .ListTenants(tenants_pb2.ListTenantsRequest(), metadata=md,
                                      timeout=TIMEOUT_S))
    for tenant in reply.tenants:
        plan = tenant.plan
        typer.echo(f"{tenant.tenant_id:24} {plan.priority:9} rpm={plan.requests_per_minute} "
                   f"input_tpm={plan.input_tokens_per_minute} "
                   f"output_tpm={plan.output_tokens_per_minute} "
                   f"concurrency={plan.max_concurrency} budget={plan.monthly_token_budget}")


@key_app.command("issue")
def key_issue(
    tenant_id: str, role: str = typer.Option("user", "--role", help="user | admin"),
    expires: str = typer.Option(None, "--expires", help="e.g. 30d, 12h, or 2027-01-31"),
    gateway: str = GATEWAY, api_key: str = API_KEY,
) -> None:
    """Print a new key once (only its hash is stored)."""
    request = tenants_pb2.IssueKeyRequest(tenant_id=tenant_id, role=role,
                                          expires_at=parse_expiry(expires))
    reply = call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                         .IssueKey(request, metadata=md, timeout=TIMEOUT_S))
    typer.echo(reply.api_key)
    typer.echo(f"key_id={reply.key.key_id} tenant={reply.key.tenant_id} role={reply.key.role}"
               + (f" expires_at={reply.key.expires_at:.0f}" if reply.key.expires_at else ""),
               err=True)


@key_app.command("revoke")
def key_revoke(key_id: str, gateway: str = GATEWAY, api_key: str = API_KEY) -> None:
    request = tenants_pb2.RevokeKeyRequest(key_id=key_id)
    reply = call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                         .RevokeKey(request, metadata=md, timeout=TIMEOUT_S))
    typer.echo(f"revoked {reply.key_id} (tenant {reply.tenant_id})")


@key_app.command("list")
def key_list(tenant_id: str = typer.Argument(""), gateway: str = GATEWAY,
             api_key: str = API_KEY) -> None:
    request = tenants_pb2.ListKeysRequest(tenant_id=tenant_id)
    reply = call_gateway(gateway, api_key, lambda ch, md: tenants_pb2_grpc.TenantAdminStub(ch)
                         .ListKeys(request, metadata=md, timeout=TIMEOUT_S))
    for key in reply.keys:
        expires = f" expires_at={key.expires_at:.0f}" if key.expires_at else ""
        typer.echo(f"{key.key_id} {key.tenant_id} {key.role}{expires}")


@key_app.command("bootstrap")
def key_bootstrap(
    tenant_id: str = typer.Argument("operators", help="The tenant the first admin key belongs to."),
    etcd_endpoint: str = typer.Option(..., "--etcd", envvar="INFERMESH_ETCD",
                                      help="host:port of etcd (operators only: no API key yet)"),
) -> None:
    """Create the first admin key (and its tenant, if missing) directly in etcd: the admin API
    needs an admin key, so a new cluster starts here."""

    async def bootstrap() -> tuple[str, ApiKey]:
        async with etcd.connect(etcd_endpoint, TIMEOUT_S) as client:
            store = TenantStore(client)
            with contextlib.suppress(errors.FailedPrecondition):  # it exists: keep its plan
                await store.create_tenant(Tenant(tenant_id, tenant_id))
            return await store.issue_key(tenant_id, role="admin")

    try:
        clear, key = asyncio.run(bootstrap())
    except errors.MeshError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(clear)
    typer.echo(f"key_id={key.key_id} tenant={key.tenant_id} role=admin", err=True)
