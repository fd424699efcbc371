"""docker-compose.yml cannot run here (no Docker): check it against the code instead."""

import re

import pytest
import yaml
from django.conf import settings

from jobs import app
from tests.processes import QUEUES, REPO
from tests.test_settings import variables_in_example


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def command(service: dict) -> str:
    value = service.get("command", [])
    return " ".join(value) if isinstance(value, list) else str(value)


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


def test_each_declared_queue_has_exactly_one_worker_service(services):
    consumed = [
        queue
        for service in services.values()
        if " worker " in command(service)
        for queue in re.search(r"-Q (\S+)", command(service)).group(1).split(",")  # type: ignore[union-attr]
    ]

    assert sorted(consumed) == sorted(QUEUES)


def test_exactly_one_beat_and_every_celery_command_uses_the_project_app(services):
    celery_commands = [command(s) for s in services.values() if "celery" in command(s)]

    assert sum(" beat" in c for c in celery_commands) == 1
    assert all(c.startswith("celery -A jobs ") for c in celery_commands)


def test_worker_grace_period_outlasts_the_longest_task_and_soft_shutdown(services):
    app.loader.import_default_modules()
    longest = max(
        task.time_limit or settings.CELERY_TASK_TIME_LIMIT
        for name, task in app.tasks.items()
        if not name.startswith("celery.")
    )
    needed = longest + settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT

    for name, service in services.items():
        if " worker " in command(service):
            assert seconds(service["stop_grace_period"]) > needed, name


def test_redis_is_configured_as_a_broker_should_be(services):
    redis_command = command(services["redis"])

    assert "--appendonly yes" in redis_command
    assert "--appendfsync everysec" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert "healthcheck" in services["redis"]


def test_every_variable_compose_sets_is_one_the_project_reads(services):
    known = variables_in_example()
    app_services = [s for s in services.values() if s.get("image") == "reliable-shop"]

    assert len(app_services) >= 8
    for service in app_services:
        assert set(service["environment"]) <= known


def test_flower_runs_authenticated_persistent_and_read_only_by_default(services):
    flower = services["flower"]

    for flag in ("--persistent=True", "--purge_offline_workers=3600"):
        assert flag in command(flower)
    assert {"FLOWER_BASIC_AUTH", "FLOWER_COOKIE_SECRET"} <= set(flower["environment"])
    assert flower["environment"]["FLOWER_READ_ONLY"] == "${FLOWER_READ_ONLY:-true}"


def test_every_alert_uses_only_exported_metrics_and_has_a_runbook_section(client, db, broker):
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from jobs import metrics

    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    # the event metrics the code defines (a scrape omits those no process touched yet),
    # and the state metrics a scrape reads
    families = [
        family
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    ] + list(text_string_to_metric_families(client.get("/metrics").content.decode()))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    exported = {f.name + s for f in families for s in ["", *suffixes.get(f.type, [])]}
    runbook = (REPO / "deploy" / "RUNBOOK.md").read_text()
    headings = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]

    assert len(alerts) >= 7
    for rule in alerts:
        used = set(re.findall(r"\b(jobs_[a-z_]+)\b", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
        assert rule["annotations"]["runbook"] == f"deploy/RUNBOOK.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in headings
