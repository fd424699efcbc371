"""docker-compose.yml and deploy/Dockerfile cannot run here (no Docker): check them against
the code instead; and the alert rules and the Grafana dashboard against the metrics the
code exports."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.conf import settings

from tests.helpers import (
    BIN,
    GATEWAY_IMAGE,
    IMAGES,
    QUEUES,
    REPO,
    SHOP_IMAGE,
    context_files,
    dockerfile_stages,
    image_files,
    longest_time_limit,
    statements,
    variables_in_example,
    variables_read_by_start_scripts,
    wait_until,
)


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def command(service: dict) -> str:
    value = service.get("command", [])
    return " ".join(value) if isinstance(value, list) else str(value)


def role(service: dict) -> str:
    """The start script a service of the project's image runs (deploy/bin/<role>)."""
    first = service["command"][0]
    assert first.startswith("deploy/bin/"), first
    return str(first.removeprefix("deploy/bin/"))


def app_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s.get("image") == SHOP_IMAGE}


def workers(services: dict[str, dict]) -> dict[str, str]:
    """Worker service -> the queue it consumes."""
    return {
        name: s["command"][1] for name, s in app_services(services).items() if role(s) == "worker"
    }


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


def scripts() -> dict[str, str]:
    """The start scripts (executable); deploy/bin also holds a file they source."""
    return {p.name: p.read_text() for p in sorted(BIN.iterdir()) if p.stat().st_mode & 0o111}


def compose_errors(document: dict) -> str:
    """What the Compose specification finds wrong with the file ('' when nothing).
    compose-spec reads the YAML after PyYAML has resolved the anchors and merge keys."""
    from compose_spec import PyCompose

    try:
        PyCompose.from_yaml(yaml.safe_dump(document))
    except ValueError as exc:
        return str(exc)
    return ""


def test_the_file_follows_the_compose_specification():
    document = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    broken = yaml.safe_load(yaml.safe_dump(document))
    broken["services"]["web"]["healthcheck"]["interval"] = "often"

    assert compose_errors(document) == ""
    assert "does not contain ASCII digits" in compose_errors(broken)  # the check can fail


def test_every_role_runs_a_start_script_with_strict_flags_that_execs():
    assert set(scripts()) >= {"web", "worker", "beat", "flower", "migrate", "gateway"}
    for name, text in scripts().items():
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert statements(text)[0] == "set -euo pipefail", name
        # exec: the process the container runs gets the stop signal, not a shell around it
        assert statements(text)[-1].startswith("exec "), name


def test_every_service_of_the_image_runs_one_of_the_start_scripts(services):
    in_image = app_services(services)

    assert len(in_image) >= 8
    for name, service in in_image.items():
        assert role(service) in scripts(), name


def test_each_declared_queue_has_exactly_one_worker_service(services):
    assert sorted(workers(services).values()) == sorted(QUEUES)


def test_start_scripts_name_real_entry_points():
    from django.core.management import get_commands

    text = "\n".join(scripts().values())
    celery_calls = re.findall(r"^exec celery (.*)", text, re.MULTILINE)
    commands = re.findall(r"python manage\.py (\w+)", text)

    assert len(celery_calls) == 4  # worker, worker-alive, beat, flower
    assert all(call.startswith("-A jobs ") for call in celery_calls)
    assert 'celery -A jobs worker -Q "$queue"' in scripts()["worker"]
    assert commands
    assert set(commands) <= set(get_commands())
    assert 'gunicorn "${WEB_APP:-shop.wsgi:application}"' in scripts()["web"]
    assert "python -m deploy.gateway" in scripts()["gateway"]


def test_start_scripts_read_only_variables_of_the_example_env_file():
    used = variables_read_by_start_scripts()

    assert used  # the regex found them
    assert used <= variables_in_example()


def test_exactly_one_beat(services):
    assert [role(s) for s in app_services(services).values()].count("beat") == 1
    assert "celery -A jobs beat" in scripts()["beat"]


def test_each_worker_grace_period_outlasts_its_queues_longest_task_and_soft_shutdown(services):
    for name, queue in workers(services).items():
        needed = longest_time_limit(queue) + settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT

        assert seconds(services[name]["stop_grace_period"]) > needed, (name, needed)


def test_every_long_running_service_has_a_healthcheck_and_starts_in_order(services):
    for name, service in services.items():
        if service.get("restart") != "no":
            assert service.get("healthcheck", {}).get("test"), name
        if name in app_services(services) and "healthcheck" in service:
            probe = service["healthcheck"]["test"]
            assert probe[0] == "CMD", name  # a start script of the image, not a shell line
            assert probe[1].removeprefix("deploy/bin/") in scripts(), (name, probe)
        for needed, condition in (service.get("depends_on") or {}).items():
            assert needed in services, (name, needed)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], (name, needed)
            else:
                assert condition["condition"] == "service_completed_successfully"
                assert services[needed].get("restart") == "no", (name, needed)
    for name in app_services(services):
        if name != "migrate":
            assert "migrate" in services[name]["depends_on"], name


def test_worker_healthchecks_ping_their_own_worker(services):
    for name, queue in workers(services).items():
        assert services[name]["healthcheck"]["test"] == ["CMD", "deploy/bin/worker-alive", queue]
        assert services[name]["healthcheck"]["interval"]  # merged from x-worker
    assert '-n "${queue}@%h"' in scripts()["worker"]
    assert '--destination "${queue}@$(hostname)"' in scripts()["worker-alive"]


def test_each_worker_has_its_own_concurrency_and_limits(services):
    for name in workers(services):
        service = services[name]
        assert "--concurrency" in service["command"], name
        assert service["cpus"], name
        assert service["mem_limit"], name


def test_redis_is_configured_as_a_broker_should_be(services):
    redis_command = command(services["redis"])

    assert "--appendonly yes" in redis_command
    assert "--appendfsync everysec" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert "healthcheck" in services["redis"]


def test_every_variable_compose_sets_is_one_the_project_reads(services):
    known = variables_in_example()

    for service in app_services(services).values():
        assert set(service["environment"]) <= known


def test_flower_runs_authenticated_persistent_and_read_only_by_default(services):
    flower = services["flower"]

    assert role(flower) == "flower"
    for flag in ("--persistent=True", "--purge_offline_workers=3600"):
        assert flag in scripts()["flower"]
    assert {"FLOWER_BASIC_AUTH", "FLOWER_COOKIE_SECRET"} <= set(flower["environment"])
    assert flower["environment"]["FLOWER_READ_ONLY"] == "${FLOWER_READ_ONLY:-true}"


@pytest.fixture
def exported(client, db, broker) -> set[str]:
    """Every series name the project exports: the event metrics the code defines (a
    scrape omits those no process touched yet) and the state metrics a scrape reads."""
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from jobs import metrics

    def whole_scrape() -> list | None:
        """A scrape with every part read (one right after a broker restart in an earlier
        test may miss a part, and says so in jobs_scrape_errors)."""
        scraped = list(text_string_to_metric_families(client.get("/metrics").content.decode()))
        errors = [f for f in scraped if f.name == "jobs_scrape_errors"]
        return scraped if all(s.value == 0 for f in errors for s in f.samples) else None

    families = [
        family
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    ] + wait_until(whole_scrape, timeout=20, interval=1, what="a scrape with every part")
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {f.name + s for f in families for s in ["", *suffixes.get(f.type, [])]}


def test_every_rule_uses_only_exported_metrics_and_every_alert_has_a_runbook_section(exported):
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    runbook = (REPO / "deploy" / "RUNBOOK.md").read_text()
    headings = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    every = [rule for group in rules["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in every if "record" in rule}
    alerts = [rule for rule in every if "alert" in rule]

    assert len(alerts) >= 15
    for rule in every:
        used = set(re.findall(r"(?<![\w:])(jobs_[a-z_]+)\b", rule["expr"]))
        assert used or set(re.findall(r"[\w:]+", rule["expr"])) & recorded, rule
        assert used <= exported, (rule.get("alert", rule.get("record")), used - exported)
    for rule in alerts:
        assert rule["annotations"]["runbook_url"] == f"deploy/RUNBOOK.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in headings


def test_the_grafana_dashboard_charts_only_exported_metrics(exported):
    dashboard = json.loads((REPO / "deploy" / "grafana" / "jobs.json").read_text())
    panels = dashboard["panels"]

    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    charted: set[str] = set()
    for panel in panels:
        for target in panel["targets"]:
            used = set(re.findall(r"\b(jobs_[a-z_]+)\b", target["expr"]))
            assert used, (panel["title"], target["expr"])
            assert used <= exported, (panel["title"], used - exported)
            charted |= used
    # the signals the alerts fire on are all on the dashboard
    for name in ("jobs_queue_depth", "jobs_dead_letters", "jobs_canary_age_seconds"):
        assert name in charted


def test_the_image_never_holds_secrets_local_state_or_the_dev_virtualenv():
    ignored = set((REPO / ".dockerignore").read_text().split())
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()

    assert {".env", ".venv", "var", ".git"} <= ignored
    assert "--require-hashes" in dockerfile  # the locked dependencies
    assert "requirements/base.txt" in dockerfile  # without the dev tools
    assert "\nUSER 10001\n" in dockerfile  # not root, and numeric: runAsNonRoot can check it
    # the virtualenv's build, the shop's files, the gateway's image, then the shop's
    assert list(dockerfile_stages()) == ["build", "source", "gateway", "shop"]
    held = image_files("shop")
    assert not {f for f in held if f == ".env" or f.startswith((".venv/", "var/", ".git/"))}
    assert ".env.example" in held  # (the files are read: the check can fail)


def test_the_shop_image_never_holds_the_fake_gateway_which_has_an_image_of_its_own():
    stages = dockerfile_stages()
    shop, gateway = image_files("shop"), image_files("gateway")
    fake = {f for f in context_files() if f.startswith("deploy/gateway/")}

    assert "deploy/gateway/server.py" in fake  # the context has it: the check can fail
    assert list(stages)[-1] == "shop"  # the default target: a plain `docker build`
    assert {"manage.py", "shop/settings.py", "jobs/base.py", "deploy/bin/web"} <= shop
    assert not shop & (fake | {"deploy/bin/gateway"})
    # the gateway's image: Python's standard library and the gateway, no virtualenv
    assert gateway == fake | {"deploy/__init__.py", "deploy/bin/gateway", "deploy/bin/http-ok"}
    assert not [line for line in stages["gateway"] if "--from=" in line]
    assert 'CMD ["deploy/bin/gateway"]' in stages["gateway"]


@pytest.mark.stack
def test_the_gateway_images_files_run_the_gateway_on_the_standard_library_alone(tmp_path):
    for name in image_files("gateway"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    log = (tmp_path / "gateway.log").open("w")
    # -S: no site-packages (no Django, no httpx), -E: no PYTHONPATH; in /app, as the image
    gateway = subprocess.Popen(
        [sys.executable, "-E", "-S", "-m", "deploy.gateway", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert gateway.stdout is not None
        listening = gateway.stdout.readline()
        assert listening.startswith("gateway listening on "), (tmp_path / "gateway.log").read_text()
        url = listening.split()[-1]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        probe = [str(tmp_path / "deploy" / "bin" / "http-ok"), f"{url}/healthz"]

        assert subprocess.run(probe, env=env, timeout=30, check=False).returncode == 0
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
        log.close()
    assert (tmp_path / "var" / "gateway.sqlite3").is_file()


def test_each_image_is_built_from_its_own_target_and_runs_scripts_it_holds(services):
    built = {name: s for name, s in services.items() if "build" in s}

    assert {s["image"] for s in built.values()} == set(IMAGES)
    assert services["gateway"]["image"] == GATEWAY_IMAGE
    for name, service in built.items():
        stage = IMAGES[service["image"]]
        probe = service.get("healthcheck", {}).get("test", ["CMD", "deploy/bin/http-ok"])

        assert service["build"] == {
            "context": ".",
            "dockerfile": "deploy/Dockerfile",
            "target": stage,
        }, name
        assert {f"deploy/bin/{role(service)}", probe[1]} <= image_files(stage), name
    # the stand-in gets none of the shop's settings or secrets
    assert "environment" not in services["gateway"]


def test_only_roles_whose_script_prepares_the_metrics_folder_are_given_one(services):
    prepared = {name for name, text in scripts().items() if "/metrics-dir" in text}

    assert prepared == {"web", "worker"}
    for name, service in app_services(services).items():
        if "PROMETHEUS_MULTIPROC_DIR" in service["environment"]:
            assert role(service) in prepared, name  # elsewhere the folder would not exist
