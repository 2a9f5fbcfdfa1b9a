"""`meshctl slo`: per model and SLO, the current SLI, burn rate, error budget left and firing
alerts, read from Prometheus' recording rules (deploy/monitoring) and judged with the same
definition the alerts use (services/common/slo.py)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

import typer

from deploy.monitoring.rules import BUDGET_REMAINING, OBJECTIVE, RATIO
from meshctl.config import service_endpoint
from meshctl.exits import fail
from meshctl.output import OUTPUT, Column, OutputFormat, emit, is_structured, render_table
from services.common.slo import SLO_NAMES, burn_rate

QUERY_TIMEOUT_S = 5.0
SLI_WINDOW = "1h"


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or refused a query."""


def query(prometheus: str, promql: str, timeout_s: float = QUERY_TIMEOUT_S) -> list[dict]:
    """An instant query's result vector (each item: `metric` labels and `value`)."""
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            body = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusError(f"{prometheus}: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{prometheus} refused {promql!r}: {body.get('error')}")
    return body["data"]["result"]


def _number(sample: dict) -> float | None:
    value = float(sample["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


@dataclass
class SloStatus:
    model: str
    slo: str
    tier: str
    objective: float
    error_ratio: float | None = None  # over SLI_WINDOW; None: no eligible traffic in it
    budget_remaining: float | None = None  # over the period; negative when overspent
    alerts: list[str] = field(default_factory=list)  # "Name(severity)"

    @property
    def burn(self) -> float | None:
        if self.error_ratio is None:
            return None
        return burn_rate(self.error_ratio, self.objective)


def slo_statuses(prometheus: str) -> list[SloStatus]:
    """One row per (model, SLO) that Prometheus has recorded, sorted by model then SLO."""
    objectives = {(s["metric"]["slo"], s["metric"]["tier"]): float(s["value"][1])
                  for s in query(prometheus, OBJECTIVE)}
    rows: dict[tuple[str, str], SloStatus] = {}

    def row(sample: dict) -> SloStatus:
        labels = sample["metric"]
        key = (labels["model"], labels["slo"])
        if key not in rows:
            rows[key] = SloStatus(labels["model"], labels["slo"], labels["tier"],
                                  objectives[(labels["slo"], labels["tier"])])
        return rows[key]

    for sample in query(prometheus, RATIO.format(window=SLI_WINDOW)):
        row(sample).error_ratio = _number(sample)
    for sample in query(prometheus, BUDGET_REMAINING):
        row(sample).budget_remaining = _number(sample)
    for sample in query(prometheus, 'ALERTS{alertstate="firing",slo!=""}'):
        labels = sample["metric"]
        if (labels.get("model"), labels["slo"]) in rows:
            rows[(labels["model"], labels["slo"])].alerts.append(
                f"{labels['alertname']}({labels.get('severity', '?')})")
    order = {name: i for i, name in enumerate(SLO_NAMES)}
    return sorted(rows.values(), key=lambda r: (r.model, order.get(r.slo, len(order))))


def mesh_alerts(prometheus: str) -> list[str]:
    """Firing alerts that belong to no model's SLO (etcd, replicas, audit, quota, targets)."""
    return sorted(
        f"{s['metric']['alertname']}({s['metric'].get('severity', '?')})"
        + (f" {s['metric']['job']}" if "job" in s["metric"] else "")
        for s in query(prometheus, 'ALERTS{alertstate="firing",slo=""}')
    )


def _percent(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def status_dict(status: SloStatus) -> dict:
    """One row's output data: the dataclass's fields, plus the SLI and burn rate it implies."""
    return {**asdict(status),
            "sli": None if status.error_ratio is None else 1 - status.error_ratio,
            "burn_rate": status.burn, "window": SLI_WINDOW}


COLUMNS = [
    Column("MODEL", lambda r: r["model"]), Column("SLO", lambda r: r["slo"]),
    Column("TIER", lambda r: r["tier"]),
    Column("OBJECTIVE", lambda r: _percent(r["objective"], 2)),
    Column(f"SLI {SLI_WINDOW}", lambda r: _percent(r["sli"], 3)),
    Column(f"BURN {SLI_WINDOW}",
           lambda r: "-" if r["burn_rate"] is None else f"{r['burn_rate']:.2f}x"),
    Column("BUDGET LEFT", lambda r: _percent(r["budget_remaining"], 1)),
    Column("FIRING", lambda r: ", ".join(r["alerts"]) or "-"),
    Column("ERROR RATIO", lambda r: "-" if r["error_ratio"] is None
           else f"{r['error_ratio']:.6f}", wide=True),
]


def format_table(statuses: list[SloStatus]) -> str:
    return render_table(COLUMNS, [status_dict(s) for s in statuses], wide=False)


def prometheus_endpoint(flag: str | None) -> str:
    return service_endpoint("prometheus", flag)


def slo(
    prometheus: str = typer.Option(None, "--prometheus",
                                   help="host:port [env INFERMESH_PROMETHEUS]"),
    output: OutputFormat = OUTPUT,
) -> None:
    """Print each model's SLIs, burn rate, error budget left and firing alerts; exit 8 when
    Prometheus cannot be reached."""
    endpoint = prometheus_endpoint(prometheus)
    try:
        statuses = slo_statuses(endpoint)
        others = mesh_alerts(endpoint)
    except PrometheusError as exc:
        fail("UNAVAILABLE", str(exc))
    rows = [status_dict(s) for s in statuses]
    if is_structured(output):
        emit(output, {"slos": rows, "other_alerts": others}, [])
        return
    if not statuses:
        typer.echo("no SLO data yet: no generation has been recorded", err=True)
    else:
        emit(output, rows, COLUMNS)
    typer.echo(f"\nother firing alerts: {', '.join(others) if others else 'none'}")
