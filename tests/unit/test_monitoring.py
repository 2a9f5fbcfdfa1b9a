"""The SLO definitions, the generated rule files (current, valid, every alert with a runbook) and
their promtool unit tests: each burn-rate alert fires on a synthetic breach and stays quiet on
noise and on the callers' own errors (deploy/monitoring/tests/*.yml)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import tomllib

import pydantic
import pytest
import yaml

from deploy.monitoring import __main__ as generate
from services.common import slo

MONITORING = pathlib.Path(generate.__file__).resolve().parent
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((MONITORING / "tests").glob("*_test.yml"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make install` installs Debian's prometheus package"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_committed_rules_and_dashboards_are_current() -> None:
    files = generate.render(slo.load_slo_config())
    stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run `make monitoring`: {stale}"
    assert len(RULE_FILES) == 2


def test_promtool_accepts_the_rule_files() -> None:
    result = _promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(test_file: pathlib.Path) -> None:
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_burn_alert_of_every_tier_has_a_promtool_scenario() -> None:
    tested = "".join(p.read_text() for p in PROMTOOL_TESTS)
    for name in generate.rules.ALERT_NAMES.values():
        assert f'alertname="{name}",alertstate="firing"' in tested, name
    mesh_rules = yaml.safe_load((MONITORING / "rules" / "mesh.rules.yml").read_text())
    for group in mesh_rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert f"alertname: {rule['alert']}" in tested or (
                    f'alertname="{rule["alert"]}"' in tested), rule["alert"]


def test_every_alert_has_a_severity_summary_and_runbook() -> None:
    alerts = [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert len(alerts) >= 12
    for rule in alerts:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert len(rule["annotations"]["summary"]) > 20, rule["alert"]
        assert len(rule["annotations"]["runbook"]) > 40, rule["alert"]


def test_burn_alerts_use_the_workbook_windows_and_each_tiers_budget() -> None:
    config = slo.load_slo_config()
    groups = {g["name"]: g for g in generate.rules.slo_rule_groups(config)}
    page = next(r for r in groups["infermesh-slo-batch"]["rules"]
                if r.get("alert") == "InfermeshAvailabilityBudgetBurn"
                and r["labels"]["severity"] == "page")
    assert "ratio_rate1h" in page["expr"] and "ratio_rate5m" in page["expr"]
    assert "ratio_rate6h" in page["expr"] and "ratio_rate30m" in page["expr"]
    assert "/ 0.005 > 14.4" in page["expr"] and "/ 0.005 > 6" in page["expr"]


def test_dashboards_have_unique_uids_and_every_panel_a_query() -> None:
    boards = generate.dashboards.build_all()
    assert set(boards) == {"overview", "tenant", "model-versions", "replicas"}
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert panels, name
        for panel in panels:
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])


# -- the definition itself ---------------------------------------------------------------------


def test_burn_rate_is_error_ratio_over_budget() -> None:
    assert slo.error_ratio(5, 1000) == 0.005
    assert slo.error_ratio(0, 0) is None
    assert slo.burn_rate(0.005, 0.999) == pytest.approx(5.0)
    assert slo.burn_rate(0.0144, 0.999) == pytest.approx(14.4)
    with pytest.raises(ValueError, match="objective"):
        slo.burn_rate(0.1, 1.0)
    with pytest.raises(ValueError, match="bad=-1"):
        slo.error_ratio(-1, 10)


def test_breaching_needs_both_windows_over_the_factor() -> None:
    fast = slo.PAGE_WINDOWS[0]
    assert (fast.long, fast.short, fast.factor) == ("1h", "5m", 14.4)
    assert slo.breaching(fast, 20.0, 15.0)
    assert not slo.breaching(fast, 20.0, 2.0)  # the burn stopped: the short window clears first
    assert not slo.breaching(fast, 3.0, 50.0)  # a blip: the long window is calm
    assert not slo.breaching(fast, None, 50.0)


def test_default_tier_covers_every_model_other_tiers_do_not_name() -> None:
    config = slo.load_slo_config()
    assert config.tier_of("demo-chat") == "interactive"
    assert config.tier_of("a-new-model") == config.default_tier
    assert config.model_selector(config.default_tier) == 'model!~"demo-batch"'
    assert config.model_selector("batch") == 'model=~"demo-batch"'


def test_version_query_is_the_alerts_definition_for_one_version() -> None:
    config = slo.load_slo_config()
    query = slo.version_error_ratio_query(config, "ttft", "demo-chat", "sha256:abc", "30m")
    assert 'model="demo-chat",version="sha256:abc",le="1.0"' in query
    with pytest.raises(ValueError, match="window"):
        slo.version_error_ratio_query(config, "ttft", "demo-chat", "v1", "2d")
    with pytest.raises(ValueError, match="model"):
        slo.version_error_ratio_query(config, "ttft", 'x"}', "v1", "5m")


def _config_with(**changes: object) -> dict:
    raw = tomllib.loads((MONITORING / "slo.toml").read_text())
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"default_tier": "gold"}, "default_tier"),
        ({"period_days": 400}, "period_days"),
        ({"client_error_codes": ["OK"]}, "client_error_codes"),
        ({"tiers": {"x": {"availability": 1.5, "ttft": {"threshold_s": 1, "objective": 0.9},
                          "itl": {"threshold_s": 1, "objective": 0.9}}}}, "availability"),
        ({"tiers": {"x": {"availability": 0.99, "ttft": {"threshold_s": -1, "objective": 0.9},
                          "itl": {"threshold_s": 1, "objective": 0.9}}}}, "threshold_s"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_config_errors_name_the_field(changes: dict, names: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=names):
        slo.SloConfig.model_validate(_config_with(**changes))


def test_a_model_in_two_tiers_is_refused() -> None:
    raw = _config_with()
    raw["tiers"]["batch"]["models"] = ["demo-chat"]
    with pytest.raises(pydantic.ValidationError, match="demo-chat"):
        slo.SloConfig.model_validate(raw)
