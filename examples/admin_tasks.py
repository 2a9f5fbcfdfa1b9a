"""An admin's everyday tasks through the SDK, with an admin key (what `meshctl` does over gRPC).

    python examples/admin_tasks.py onboard acme --rpm 120     # a tenant, its plan and a key
    python examples/admin_tasks.py rollout demo-chat          # versions, who serves, history
    python examples/admin_tasks.py rollback demo-chat --reason "worse answers"
    python examples/admin_tasks.py audit --tenant acme --minutes 60

The gateway, the registry and the auditor come from INFERMESH_GATEWAY, INFERMESH_REGISTRY and
INFERMESH_AUDITOR (or a local stack's env file), the key from INFERMESH_API_KEY. The registry and
the auditor ask for the operator's certificate: `source .infermesh/operator-env` first (or set
INFERMESH_ENV_FILE=.infermesh/operator-env).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone

from infermesh_client import Client, InfermeshError, PlanChange


def onboard(client: Client, args: argparse.Namespace) -> None:
    """A new tenant with its plan, and its first key (shown once, stored nowhere)."""
    tenant = client.admin.tenants.create(args.tenant, plan=PlanChange(
        priority="standard", requests_per_minute=args.rpm, max_concurrency=args.concurrency))
    issued = client.admin.keys.issue(
        tenant.tenant_id, expires_at=datetime.now(timezone.utc) + timedelta(days=args.days))
    plan = tenant.plan
    print(f"tenant {tenant.tenant_id}: {plan.priority}, {plan.requests_per_minute} rpm, "
          f"{plan.max_concurrency} at once (revision {tenant.revision})")
    print(f"key {issued.key.key_id} expires {issued.key.expires_at:%Y-%m-%d}: {issued.api_key}")


def rollout(client: Client, args: argparse.Namespace) -> None:
    """Every version of a model, the roles they play, and the last changes."""
    routing = client.registry.routing(args.model)
    roles = {routing.production: "production", routing.previous: "previous",
             routing.canary: f"canary {routing.canary_weight_percent:g} %",
             routing.shadow: f"shadow {routing.shadow_rate:g}"}
    for version in client.registry.versions(args.model):
        print(f"{version.version_id[:19]}  {roles.get(version.version_id, '-'):<14} "
              f"{version.registered_at:%Y-%m-%d %H:%M}  {version.description}")
    for entry in client.registry.history(args.model, limit=5).entries:
        print(f"  r{entry.revision} {entry.at:%Y-%m-%d %H:%M} {entry.action} by {entry.actor}: "
              f"{entry.reason}")


def rollback(client: Client, args: argparse.Namespace) -> None:
    """Production and previous swap, recorded with the reason (compare-and-swap)."""
    change = client.registry.rollback(args.model, reason=args.reason)
    print(f"revision {change.entry.revision}: production is now {change.routing.production}")


def audit(client: Client, args: argparse.Namespace) -> None:
    """The tenant's generations of the last minutes, from the tamper-evident audit log."""
    since = datetime.now(timezone.utc) - timedelta(minutes=args.minutes)
    records = client.audit.query(tenant=args.tenant, since=since, limit=args.limit)
    for record in records:
        if record.generation is not None:
            g = record.generation
            print(f"{record.sequence} {record.appended:%H:%M:%S} {record.request_id} {g.model} "
                  f"{g.finish_reason} {g.prompt_tokens}+{g.completion_tokens} tokens")
    print(f"{len(records)} records", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    task = tasks.add_parser("onboard")
    task.add_argument("tenant")
    task.add_argument("--rpm", type=int, default=60)
    task.add_argument("--concurrency", type=int, default=4)
    task.add_argument("--days", type=int, default=90, help="the key's lifetime")
    for name in ("rollout", "rollback"):
        task = tasks.add_parser(name)
        task.add_argument("model")
    task.add_argument("--reason", required=True)
    task = tasks.add_parser("audit")
    task.add_argument("--tenant", default="")
    task.add_argument("--minutes", type=float, default=60)
    task.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    run = {"onboard": onboard, "rollout": rollout, "rollback": rollback, "audit": audit}
    with Client(timeout=10) as client:
        try:
            run[args.task](client, args)
        except InfermeshError as error:  # e.g. PermissionDenied without an admin key
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
