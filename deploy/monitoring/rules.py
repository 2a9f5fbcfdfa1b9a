"""Prometheus rule files, built from `slo.toml` and the definitions in `services.common.slo`.

`slo_rule_groups` turns each tier's objectives into error-ratio recording rules (per model, and per
model version for rollout judges), the error budget left over the period, and the SRE workbook's
multi-window burn-rate alerts. `mesh_rule_groups` records the other SLIs the dashboards and
`meshctl slo` read, and alerts on the mesh's own failure modes. Every alert carries a `runbook`
annotation: one line that says what to look at first.
"""

from __future__ import annotations

from typing import Any

from services.common import slo
from services.common.slo import SloConfig, SloName

Rule = dict[str, Any]
Group = dict[str, Any]

RATIO = "infermesh:slo_errors:ratio_rate{window}"
VERSION_RATIO = "infermesh:slo_errors_by_version:ratio_rate{window}"
BAD_RATE = "infermesh:slo_bad:rate5m"
ELIGIBLE_RATE = "infermesh:slo_eligible:rate5m"
OBJECTIVE = "infermesh:slo_objective:ratio"
BUDGET_REMAINING = "infermesh:slo_error_budget:remaining_ratio"

ALERT_NAMES: dict[SloName, str] = {
    "availability": "InfermeshAvailabilityBudgetBurn",
    "ttft": "InfermeshTTFTBudgetBurn",
    "itl": "InfermeshITLBudgetBurn",
}
SLO_RUNBOOKS: dict[SloName, str] = {
    "availability": (
        "Find the failing code and version: sum by (code, version) "
        "(rate(infermesh_gateway_generations_total{model=\"{{ $labels.model }}\"}[5m])). "
        "UNAVAILABLE: replicas or Triton (sidecar and Triton logs); DEADLINE_EXCEEDED: overload "
        "or a slow engine; failures only on a canary version: roll it back."
    ),
    "ttft": (
        "Queueing or slow prefill: compare infermesh:queue_seconds:quantile_rate5m with "
        "nv_trt_llm_request_metrics{request_type=\"waiting\"} per replica; add replicas or shed "
        "load, drain a replica that alone is slow."
    ),
    "itl": (
        "Slow decode: check the batch per replica (nv_trt_llm_request_metrics"
        "{request_type=\"active\"}) and infermesh:replica_tokens:rate5m; lower the max batch or "
        "add replicas."
    ),
}
FOR = {"page": "2m", "ticket": "15m"}


def _number(value: float) -> str:
    return f"{value:.6g}"


def slo_rule_groups(config: SloConfig) -> list[Group]:
    """One rule group per tier in use: recording rules first, then its burn-rate alerts."""
    return [_tier_group(config, tier) for tier in config.tiers_in_use()]


def _tier_group(config: SloConfig, tier_name: str) -> Group:
    tier = config.tiers[tier_name]
    selector = config.model_selector(tier_name)
    rules: list[Rule] = []
    for name in slo.SLO_NAMES:
        labels = {"slo": name, "tier": tier_name}
        rules.append({"record": OBJECTIVE, "expr": f"vector({_number(tier.objective(name))})",
                      "labels": labels})
        for window in slo.RATIO_WINDOWS:
            rules.append({
                "record": RATIO.format(window=window),
                "expr": slo.error_ratio_query(name, selector, window, "model", config, tier),
                "labels": labels,
            })
        for window in slo.VERSION_WINDOWS:
            rules.append({
                "record": VERSION_RATIO.format(window=window),
                "expr": slo.error_ratio_query(name, selector, window, "model, version", config,
                                              tier),
                "labels": labels,
            })
        eligible = slo.eligible_rate_query(name, selector, "5m", "model", config)
        bad = slo.bad_rate_query(name, selector, "5m", "model", config, tier)
        rules.append({"record": ELIGIBLE_RATE, "expr": eligible, "labels": labels})
        rules.append({"record": BAD_RATE, "expr": f"({bad}) or {eligible} * 0", "labels": labels})
        # Traffic-weighted over the period: the sums of 5m rates, not the mean of 5m ratios.
        own = f'{{slo="{name}",tier="{tier_name}"}}'
        period_ratio = RATIO.format(window=config.period)
        rules.append({
            "record": period_ratio,
            "expr": (f"sum_over_time({BAD_RATE}{own}[{config.period}]) / "
                     f"sum_over_time({ELIGIBLE_RATE}{own}[{config.period}])"),
            "labels": labels,
        })
        rules.append({
            "record": BUDGET_REMAINING,
            "expr": f"1 - {period_ratio}{own} / {_number(1 - tier.objective(name))}",
            "labels": labels,
        })
    for name in slo.SLO_NAMES:
        for severity in ("page", "ticket"):
            rules.append(_burn_alert(config, tier_name, name, severity))
    return {"name": f"infermesh-slo-{tier_name}", "rules": rules}


def _burn_alert(config: SloConfig, tier_name: str, name: SloName, severity: str) -> Rule:
    """The SRE workbook's alert: both windows of a pair over the factor, either pair."""
    budget = _number(1 - config.tiers[tier_name].objective(name))
    own = f'{{slo="{name}",tier="{tier_name}"}}'
    pairs = [w for w in slo.BURN_WINDOWS if w.severity == severity]
    conditions = [
        (f"({RATIO.format(window=w.long)}{own} / {budget} > {_number(w.factor)} and "
         f"{RATIO.format(window=w.short)}{own} / {budget} > {_number(w.factor)})")
        for w in pairs
    ]
    described = " or ".join(f"{w.long}/{w.short} > {_number(w.factor)}x" for w in pairs)
    objective = _number(config.tiers[tier_name].objective(name) * 100)
    return {
        "alert": ALERT_NAMES[name],
        "expr": " or ".join(conditions),
        "for": FOR[severity],
        "labels": {"severity": severity, "slo": name, "tier": tier_name},
        "annotations": {
            "summary": (f"{{{{ $labels.model }}}} burns its {name} error budget "
                        f"({objective}% over {config.period}) {{{{ $value | printf \"%.1f\" }}}}x "
                        f"too fast ({described})"),
            "runbook": SLO_RUNBOOKS[name],
        },
    }


# -- the other SLIs, and the mesh's own failure modes ------------------------------------------

QUANTILES = ("0.5", "0.95", "0.99")


def mesh_rule_groups(config: SloConfig) -> list[Group]:
    client = "|".join(config.client_error_codes)
    generations = slo.GENERATIONS_METRIC
    sli: list[Rule] = []
    for quantile in QUANTILES:
        for record, histogram, by in (
            ("infermesh:ttft_seconds:quantile_rate5m", "infermesh_gateway_ttft_seconds",
             "model, version"),
            ("infermesh:itl_seconds:quantile_rate5m", "infermesh_gateway_itl_seconds",
             "model, version"),
            ("infermesh:queue_seconds:quantile_rate5m", "infermesh_gateway_queue_seconds",
             "model"),
            ("infermesh:ttft_seconds_by_zone:quantile_rate5m", "infermesh_gateway_ttft_seconds",
             "model, zone"),
        ):
            sli.append({
                "record": record,
                "expr": (f"histogram_quantile({quantile}, sum by ({by}, le) "
                         f"(rate({histogram}_bucket[5m])))"),
                "labels": {"quantile": quantile},
            })
    eligible_by_tenant = (f'sum by (tenant, model, version) '
                          f'(rate({generations}{{code!~"{client}"}}[5m]))')
    sli += [
        {"record": "infermesh:generations:rate5m",
         "expr": f"sum by (tenant, model, version, code) (rate({generations}[5m]))"},
        {"record": "infermesh:availability:ratio_rate5m",
         "expr": (f'sum by (tenant, model, version) (rate({generations}{{code="OK"}}[5m])) '
                  f"/ {eligible_by_tenant}")},
        {"record": "infermesh:stream_completion:ratio_rate5m",
         "expr": (f'sum by (model, version) (rate({generations}{{finish_reason=~"stop|length"}}'
                  f"[5m])) / sum by (model, version) (rate({generations}[5m]))")},
        {"record": "infermesh:shed:rate5m",
         "expr": (f'sum by (tenant, model, code) (rate({generations}'
                  f'{{code=~"RESOURCE_EXHAUSTED|UNAVAILABLE"}}[5m]))')},
        {"record": "infermesh:tokens:rate5m",
         "expr": "sum by (tenant, model, kind) (rate(infermesh_gateway_tokens_total[5m]))"},
        {"record": "infermesh:availability_by_zone:ratio_rate5m",
         "expr": (f'sum by (model, zone) (rate({generations}{{code="OK"}}[5m])) / '
                  f'sum by (model, zone) (rate({generations}{{code!~"{client}"}}[5m]))')},
        {"record": "infermesh:spend:rate5m",
         "expr": "sum by (tenant, model) (rate(infermesh_gateway_spend_total[5m]))"},
        {"record": "infermesh:cost_per_1k_tokens:rate5m",
         "expr": ("1000 * sum by (model, version) (rate(infermesh_gateway_spend_total[5m])) / "
                  "sum by (model, version) (rate(infermesh_gateway_tokens_total[5m]))")},
        {"record": "infermesh:kv_cache_used:ratio",
         "expr": ('sum by (instance, model) (nv_trt_llm_kv_cache_block_metrics'
                  '{kv_cache_block_type="used"}) / sum by (instance, model) '
                  '(nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"})')},
        {"record": "infermesh:replica_tokens:rate5m",
         "expr": ("sum by (instance, model) "
                  "(rate(infermesh_engine_generated_tokens_total[5m]))")},
        {"record": "infermesh:replica_idle:bool",
         "expr": ('sum by (instance) (nv_trt_llm_request_metrics{request_type="active"}) '
                  "== bool 0")},
        {"record": "infermesh:replica_idle_minutes:sum1h",
         "expr": "avg_over_time(infermesh:replica_idle:bool[1h]) * 60"},
    ]
    alerts: list[Rule] = [
        _alert("InfermeshNoHealthyReplica", "page", "1m",
               ('sum(infermesh_scheduler_replicas{healthy="true"}) == 0'),
               "The scheduler sees no healthy replica: every generation fails UNAVAILABLE.",
               "Check the sidecars' infermesh_sidecar_triton_ready and Triton's logs; a replica "
               "whose sidecar lost etcd drops out of routing within the lease TTL."),
        _alert("InfermeshEtcdUnreachable", "page", "1m",
               'up{job="etcd"} == 0 or etcd_server_has_leader == 0',
               "etcd is down or has no leader: the mesh serves from caches, no change lands.",
               "Check etcd's members and disk (etcdctl endpoint status); services keep serving "
               "cached tenants, keys and routes, but leases expire if it stays away."),
        _alert("InfermeshAuditEventsDropped", "page", "0m",
               "increase(infermesh_gateway_audit_dropped_total[5m]) > 0",
               "The gateway's audit queue is full and drops events: the audit log has gaps.",
               "The auditor is slow or away: check its infermesh_auditor_commit_seconds and "
               "disk; restore it before the queue overflows again."),
        _alert("InfermeshAuditEventsRefused", "ticket", "5m",
               "increase(infermesh_gateway_audit_dead_lettered_total[15m]) > 0",
               "The gateway set audit events aside (dead-letter.spool): the auditor refused "
               "them, or they were oversized or corrupt on disk.",
               "Read the gateway's audit_event_refused / audit_spool_frame_set_aside logs and "
               "dead-letter.spool in its spool directory (schema, disk)."),
        _alert("InfermeshQuotaServiceFailing", "page", "2m",
               ('up{job="ratelimit"} == 0 or sum(rate(infermesh_grpc_server_handled_total'
                '{job="ratelimit",code=~"UNAVAILABLE|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED"}[5m])) '
                "> 0"),
               "The quota service is down or failing: admission is not metered as planned.",
               "Check the ratelimit service's log and its etcd connection; while it is away the "
               "gateway cannot take quota, so tenants may run unmetered or be refused."),
        _alert("InfermeshQuotaFailingOpen", "page", "1m",
               "sum(increase(infermesh_gateway_quota_fail_open_total[5m])) > 0",
               "Gateways are admitting requests without quota (no ratelimit replica answers).",
               "Tenants run unmetered up to their concurrency per gateway: restore the ratelimit "
               "service (its log, its etcd connection), or set INFERMESH_QUOTA_FAIL_OPEN=false "
               "to refuse instead."),
        _alert("InfermeshShedRateHigh", "ticket", "15m",
               (f'sum by (model) (rate({generations}{{code="RESOURCE_EXHAUSTED"}}[15m])) / '
                f"sum by (model) (rate({generations}[15m])) > 0.1"),
               "More than 10% of {{ $labels.model }}'s generations are shed (quota or overload).",
               "Per tenant: infermesh:shed:rate5m; one tenant at its plan limit is expected, "
               "every tenant shed means too few replicas."),
        _alert("InfermeshPlacementShortfall", "ticket", "15m",
               "max by (model) (infermesh_scheduler_placement_shortfall) > 0",
               "{{ $labels.model }} has fewer copies placed than its routing and demand want.",
               "infermesh_scheduler_desired_replicas says how many are wanted: add replicas (or "
               "let the autoscaler), free GPU memory, or read the sidecars' placement_errors "
               "for a model that fails to load (the leader retries it with a back-off)."),
        _alert("InfermeshEngineRestarted", "ticket", "0m",
               "sum by (instance, model) "
               "(increase(infermesh_sidecar_engine_restarts_total[30m])) > 0",
               "{{ $labels.model }}'s engine process died on {{ $labels.instance }}; its sidecar "
               "restarted it.",
               "Triton's log on that replica holds the crashed stub's Python stacks "
               "(faulthandler) and dmesg the signal; after INFERMESH_ENGINE_MAX_RESTARTS in the "
               "window the sidecar leaves the model unloaded and reports it in "
               "placement_errors."),
        _alert("InfermeshTargetDown", "ticket", "5m", "up == 0",
               "{{ $labels.job }} ({{ $labels.instance }}) does not answer Prometheus' scrapes.",
               "Check that process's log; a service that is up but unscraped hides its SLIs."),
    ]
    return [{"name": "infermesh-sli", "rules": sli},
            {"name": "infermesh-mesh-alerts", "rules": alerts}]


def _alert(name: str, severity: str, for_: str, expr: str, summary: str, runbook: str) -> Rule:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "runbook": runbook}}
