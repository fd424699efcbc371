"""The alert rules, tested with Prometheus's own tool: `promtool check rules` and `promtool
test rules` on deploy/prometheus/alerts.test.yml. Every alert has a case that must make
it fire (nothing one evaluation before its `for:` has passed; then its labels and
annotations) and one that must not, at any minute; and each alert's cases are shown to
catch a broken rule: the rule firing at once, never, or always fails them."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO

RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
RUNBOOK = REPO / "deploy" / "RUNBOOK.md"

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is missing: `make system-deps` installs it (Debian's prometheus package)",
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def every_minute(case: dict[str, Any]) -> dict[str, Any]:
    """A case that must never fire its alert, checked at every minute up to its last check
    (the file checks it at the end; a blip inside must not fire it either)."""
    if any(check["exp_alerts"] for check in case["alert_rule_test"]):
        return case
    last = max(seconds(check["eval_time"]) for check in case["alert_rule_test"])
    alerts = {check["alertname"] for check in case["alert_rule_test"]}
    checks = [
        {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": []}
        for alert in sorted(alerts)
        for minute in range(1, last // 60 + 1)
    ]
    return {**case, "alert_rule_test": checks}


def cases_of(alert: str) -> list[dict[str, Any]]:
    """The rule-test cases that check `alert`, each with only its checks of `alert`, the
    quiet ones at every minute."""
    cases = []
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        checks = [c for c in case.get("alert_rule_test", []) if c["alertname"] == alert]
        if checks:
            cases.append(every_minute({**case, "alert_rule_test": checks}))
    return cases


def seconds(duration: str) -> int:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", duration))


def test_the_rules_are_valid():
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rule_tests_pass(tmp_path):
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # and the quiet cases stay quiet at every minute, not only at their end
    suite = yaml.safe_load(RULE_TESTS.read_text())
    suite["tests"] = [every_minute(case) for case in suite["tests"]]
    suite["rule_files"] = [str(RULES)]
    (tmp_path / "every-minute.test.yml").write_text(yaml.safe_dump(suite))
    tested = promtool("test", "rules", tmp_path / "every-minute.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.mark.parametrize("alert", sorted(alerts()))
def test_every_alert_has_a_case_that_fires_it_and_one_that_must_not(alert):
    rule = alerts()[alert]
    headings = {
        line[3:].strip().lower() for line in RUNBOOK.read_text().splitlines() if line[:3] == "## "
    }
    checks = [check for case in cases_of(alert) for check in case["alert_rule_test"]]
    fired = [check for check in checks if check["exp_alerts"]]
    quiet_cases = [
        case
        for case in cases_of(alert)
        if not any(check["exp_alerts"] for check in case["alert_rule_test"])
    ]

    assert fired, f"no case makes {alert} fire"
    assert quiet_cases, f"no case shows what must not make {alert} fire"
    for case in cases_of(alert):
        times = [seconds(check["eval_time"]) for check in case["alert_rule_test"]]
        firing = [seconds(c["eval_time"]) for c in case["alert_rule_test"] if c["exp_alerts"]]
        if firing:  # quiet one evaluation interval before it fires
            assert firing[0] - 60 in times, (alert, case["name"])
    for check in fired:
        for expected in check["exp_alerts"]:
            assert expected["exp_labels"]["severity"] == rule["labels"]["severity"]
            annotations = expected["exp_annotations"]
            assert annotations["summary"]
            anchor = annotations["runbook_url"].removeprefix("deploy/RUNBOOK.md#")
            assert anchor == alert.lower() in headings


def broken(rule: dict[str, Any], how: str) -> dict[str, Any]:
    if how == "fires at once":
        return {**rule, "for": "0s"}
    if how == "never fires":
        return {**rule, "expr": f"({rule['expr']}) and on() vector(0) > 1"}
    # always fires: every series the expression reads, whatever its value
    return {**rule, "expr": re.sub(r"(>|==)\s*[\d.]+", ">= -Inf", rule["expr"])}


@pytest.mark.parametrize("how", ["fires at once", "never fires", "always fires"])
@pytest.mark.parametrize("alert", sorted(alerts()))
def test_its_cases_catch_the_alert_broken(alert, how, tmp_path):
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        group["rules"] = [
            broken(rule, how) if rule.get("alert") == alert else rule for rule in group["rules"]
        ]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    suite = {**yaml.safe_load(RULE_TESTS.read_text()), "tests": cases_of(alert)}
    (tmp_path / "alerts.test.yml").write_text(yaml.safe_dump(suite))

    tested = promtool("test", "rules", tmp_path / "alerts.test.yml")

    assert tested.returncode != 0, f"the cases of {alert} pass with the rule {how}"


# --- The stack that watches docker-compose's shop ----------------------------------------

COMPOSE = REPO / "docker-compose.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "jobs.json"


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts of the repository: path in the container -> file here."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = REPO / source
    return found


def test_the_compose_prometheus_config_is_valid_and_loads_the_rules():
    config = mounts(compose_services()["prometheus"])["/etc/prometheus"] / "prometheus.yml"

    checked = promtool("check", "config", config)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout  # alerts.yml, beside it


def test_the_compose_prometheus_scrapes_the_web_and_every_worker_service():
    services = compose_services()
    config_dir = mounts(services["prometheus"])["/etc/prometheus"]
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    web_port = services["web"]["ports"][0].split(":")[-1]
    workers = {
        f"{name}:{service['environment']['WORKER_METRICS_PORT']}"
        for name, service in services.items()
        if name.startswith("worker-")
    }

    assert len(workers) == 4
    assert targets == {f"web:{web_port}"} | workers
    assert config["rule_files"] == ["alerts.yml"]
    assert (config_dir / "alerts.yml") == RULES


def test_the_compose_grafana_gets_the_prometheus_source_and_the_dashboard():
    services = compose_services()
    grafana = mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    provider = yaml.safe_load((provisioning / "dashboards" / "jobs.yml").read_text())
    (prometheus_port,) = [p.split(":")[-1] for p in services["prometheus"]["ports"]]
    dashboards = Path(provider["providers"][0]["options"]["path"])

    assert [s["url"] for s in source["datasources"]] == [f"http://prometheus:{prometheus_port}"]
    assert source["datasources"][0]["type"] == "prometheus"
    assert grafana[str(dashboards / "jobs.json")] == DASHBOARD
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == str(dashboards / "jobs.json")


def test_every_dashboard_query_is_valid_promql(tmp_path):
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    rules = [{"record": f"dashboard:query_{n}", "expr": q} for n, q in enumerate(queries)]
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    broken = [*rules, {"record": "dashboard:broken", "expr": "sum by (queue (jobs_queue_depth)"}]
    (tmp_path / "broken.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": broken}]})
    )

    assert len(queries) >= 20
    checked = promtool("check", "rules", tmp_path / "queries.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert promtool("check", "rules", tmp_path / "broken.yml").returncode != 0  # it can fail
