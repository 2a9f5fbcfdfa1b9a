"""Grafana dashboards as code (grafana-foundation-sdk, Grafana 11.6 JSON): an overview, one per
tenant, one per model with each version side by side (canary beside production), one per replica.

Panels read the recording rules of `rules.py` where one exists, so a dashboard and an alert never
compute the same SLI two ways; the stack test checks every metric they read is exported.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from deploy.monitoring.rules import BUDGET_REMAINING, OBJECTIVE, RATIO, VERSION_RATIO
from services.common.slo import GENERATIONS_METRIC

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
BURN_1H = (f"{RATIO.format(window='1h')} / on (slo, tier) group_left () "
           f"(1 - {OBJECTIVE})")


def _query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def _series(title: str, unit: str, *queries: tuple[str, str], span: int = 12,
            description: str = "") -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).span(span)
             .height(8).description(description))
    for ref_id, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(_query(expr, legend).ref_id(ref_id))
    return panel


def _stat(title: str, unit: str, expr: str, legend: str, span: int = 6) -> stat.Panel:
    return (stat.Panel().title(title).unit(unit).datasource(DATASOURCE).span(span).height(5)
            .with_target(_query(expr, legend).ref_id("A")))


def _variable(name: str, label: str, query: str, include_all: bool = True
              ) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(include_all)
            .multi(include_all))


def _board(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(description)
            .tags(["infermesh"]).refresh("30s").time("now-6h", "now").timezone("utc")
            .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus")
                           .type("prometheus")))


def overview() -> dashboard.Dashboard:
    return (
        _board("infermesh-overview", "infermesh / overview",
               "Traffic, availability, error-budget burn, latency and shedding of every model.")
        .with_row(dashboard.Row("SLOs"))
        .with_panel(_stat("Availability budget left (period)", "percentunit",
                          f'min({BUDGET_REMAINING}{{slo="availability"}})', "worst model"))
        .with_panel(_stat("TTFT budget left (period)", "percentunit",
                          f'min({BUDGET_REMAINING}{{slo="ttft"}})', "worst model"))
        .with_panel(_stat("ITL budget left (period)", "percentunit",
                          f'min({BUDGET_REMAINING}{{slo="itl"}})', "worst model"))
        .with_panel(_stat("Firing pages", "none",
                          'count(ALERTS{alertstate="firing",severity="page"}) or vector(0)',
                          "pages"))
        .with_panel(_series("Error-budget burn rate (1h)", "x", (BURN_1H, "{{model}} {{slo}}"),
                            description="1 spends the budget in exactly one period; the fast "
                                        "page fires above 14.4 (1h and 5m)."))
        .with_panel(_series("Availability (5m)", "percentunit",
                            (f'1 - {RATIO.format(window="5m")}{{slo="availability"}}',
                             "{{model}}")))
        .with_row(dashboard.Row("Traffic and latency"))
        .with_panel(_series("Generations by code", "reqps",
                            ("sum by (code) (infermesh:generations:rate5m)", "{{code}}")))
        .with_panel(_series("Shed (quota and overload)", "reqps",
                            ("sum by (code) (infermesh:shed:rate5m)", "{{code}}")))
        .with_panel(_series("TTFT", "s",
                            ('max by (model) (infermesh:ttft_seconds:quantile_rate5m'
                             '{quantile="0.95"})', "p95 {{model}}"),
                            ('max by (model) (infermesh:ttft_seconds:quantile_rate5m'
                             '{quantile="0.5"})', "p50 {{model}}")))
        .with_panel(_series("Inter-token latency", "s",
                            ('max by (model) (infermesh:itl_seconds:quantile_rate5m'
                             '{quantile="0.95"})', "p95 {{model}}"),
                            ('max by (model) (infermesh:itl_seconds:quantile_rate5m'
                             '{quantile="0.5"})', "p50 {{model}}")))
        .with_panel(_series("Queue wait p95", "s",
                            ('infermesh:queue_seconds:quantile_rate5m{quantile="0.95"}',
                             "{{model}}")))
        .with_panel(_series("Tokens", "short",
                            ("sum by (kind) (infermesh:tokens:rate5m)", "{{kind}}/s")))
        .with_row(dashboard.Row("Zones"))
        .with_panel(_series("Availability by zone (5m)", "percentunit",
                            ("infermesh:availability_by_zone:ratio_rate5m",
                             "{{model}} {{zone}}")))
        .with_panel(_series("TTFT p95 by zone", "s",
                            ('infermesh:ttft_seconds_by_zone:quantile_rate5m{quantile="0.95"}',
                             "{{model}} {{zone}}")))
    )


def tenant() -> dashboard.Dashboard:
    selected = 'tenant=~"$tenant"'
    return (
        _board("infermesh-tenant", "infermesh / tenant",
               "One tenant's traffic, availability, tokens and shedding.")
        .with_variable(_variable("tenant", "Tenant",
                                 f"label_values({GENERATIONS_METRIC}, tenant)"))
        .with_panel(_series("Generations by code", "reqps",
                            (f"sum by (tenant, code) (infermesh:generations:rate5m{{{selected}}})",
                             "{{tenant}} {{code}}")))
        .with_panel(_series("Availability (5m, caller errors excluded)", "percentunit",
                            (f"infermesh:availability:ratio_rate5m{{{selected}}}",
                             "{{tenant}} {{model}} {{version}}")))
        .with_panel(_series("Tokens", "short",
                            (f"infermesh:tokens:rate5m{{{selected}}}",
                             "{{tenant}} {{model}} {{kind}}/s")))
        .with_panel(_series("Shed", "reqps",
                            (f"infermesh:shed:rate5m{{{selected}}}",
                             "{{tenant}} {{model}} {{code}}")))
        .with_panel(_series("Spend (at the versions' prices)", "currencyUSD",
                            (f"infermesh:spend:rate5m{{{selected}}} * 3600",
                             "{{tenant}} {{model}} per hour")))
    )


def model_versions() -> dashboard.Dashboard:
    selected = 'model=~"$model"'
    return (
        _board("infermesh-model", "infermesh / model and version",
               "One model, each version on its own line: a canary beside production.")
        .with_variable(_variable("model", "Model",
                                 f"label_values({GENERATIONS_METRIC}, model)", False))
        .with_panel(_series("Generations by version", "reqps",
                            (f"sum by (version) (infermesh:generations:rate5m{{{selected}}})",
                             "{{version}}")))
        .with_panel(_series("Error ratio by version (5m, as the alerts define it)", "percentunit",
                            (f'{VERSION_RATIO.format(window="5m")}{{{selected}}}',
                             "{{version}} {{slo}}")))
        .with_panel(_series("TTFT p95 by version", "s",
                            (f'infermesh:ttft_seconds:quantile_rate5m{{{selected},'
                             f'quantile="0.95"}}', "{{version}}")))
        .with_panel(_series("ITL p95 by version", "s",
                            (f'infermesh:itl_seconds:quantile_rate5m{{{selected},'
                             f'quantile="0.95"}}', "{{version}}")))
        .with_panel(_series("Streams completed (stop or length)", "percentunit",
                            (f"infermesh:stream_completion:ratio_rate5m{{{selected}}}",
                             "{{version}}")))
        .with_panel(_series("Error budget left (period)", "percentunit",
                            (f"{BUDGET_REMAINING}{{{selected}}}", "{{slo}}")))
        .with_panel(_series("Cost per 1k tokens by version", "currencyUSD",
                            (f"infermesh:cost_per_1k_tokens:rate5m{{{selected}}}",
                             "{{version}}")))
    )


def replicas() -> dashboard.Dashboard:
    selected = 'instance=~"$instance"'
    return (
        _board("infermesh-replica", "infermesh / replica",
               "Each Triton replica: batch, queue, KV cache, tokens/s, idle time, readiness.")
        .with_variable(_variable("instance", "Replica",
                                 "label_values(nv_trt_llm_request_metrics, instance)"))
        .with_panel(_series("Batch (active requests)", "short",
                            (f'sum by (instance) (nv_trt_llm_request_metrics{{{selected},'
                             f'request_type="active"}})', "{{instance}}")))
        .with_panel(_series("Queue (waiting requests)", "short",
                            (f'sum by (instance) (nv_trt_llm_request_metrics{{{selected},'
                             f'request_type="waiting"}})', "{{instance}}")))
        .with_panel(_series("Tokens/s", "short",
                            (f"infermesh:replica_tokens:rate5m{{{selected}}}",
                             "{{instance}} {{model}}")))
        .with_panel(_series("KV cache used", "percentunit",
                            (f"infermesh:kv_cache_used:ratio{{{selected}}}",
                             "{{instance}} {{model}}")))
        .with_panel(_series("Idle minutes in the last hour", "m",
                            (f"infermesh:replica_idle_minutes:sum1h{{{selected}}}",
                             "{{instance}}")))
        .with_panel(_series("Sidecar: Triton ready", "short",
                            ("infermesh_sidecar_triton_ready", "{{replica}}"),
                            ('sum(infermesh_scheduler_replicas{healthy="true"})',
                             "healthy replicas (scheduler)")))
        .with_panel(_series("Placement: desired replicas (autoscaling signal) and shortfall",
                            "short",
                            ("max by (model) (infermesh_scheduler_desired_replicas)",
                             "desired {{model}}"),
                            ("max by (model) (infermesh_scheduler_placement_shortfall)",
                             "unplaced {{model}}")))
    )


def build_all() -> dict[str, dict[str, Any]]:
    """Dashboard name → Grafana JSON model."""
    encoder = JSONEncoder()
    boards = {"overview": overview(), "tenant": tenant(), "model-versions": model_versions(),
              "replicas": replicas()}
    built = {name: json.loads(encoder.encode(board.build())) for name, board in boards.items()}
    for board in built.values():  # stable panel ids, so links and diffs survive regeneration
        for panel_id, panel in enumerate(board["panels"], start=1):
            panel["id"] = panel_id
    return built
