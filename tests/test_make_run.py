"""`make run`'s stack on the embedded default (SQLite) serves the shop and completes an
order; without Redis it starts a private one, or stops with a message saying what to do."""

import shutil
import subprocess
import sys

import httpx
import pytest

from tests.helpers import (
    REPO,
    answers,
    free_port,
    runner_env,
    start_make_run,
    stop_make_run,
    wait_until,
)

pytestmark = pytest.mark.stack


def test_make_run_on_sqlite_serves_the_shop_and_completes_an_order(tmp_path):
    broker_port = free_port()  # nothing listens there: the runner starts a private Redis
    env = runner_env(tmp_path, broker_port)
    site = f"http://127.0.0.1:{env['WEB_PORT']}"
    log = tmp_path / "run.log"
    proc = start_make_run(env, log)

    def shop_answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"make run exited early:\n{log.read_text()[-3000:]}")
        return answers(f"{site}/")

    try:
        wait_until(shop_answers, timeout=90, what="the shop to answer")
        output = log.read_text()
        assert "starting a private redis-server" in output
        assert "admin login created (shown once)" in output
        assert (tmp_path / "var" / "shop.sqlite3").exists()
        assert "Enamel camp mug" in httpx.get(f"{site}/").text
        assert answers(f"{site}/admin/login/")

        response = httpx.post(
            f"{site}/api/orders/",
            json={
                "email": "ada@example.com",
                "card_token": "tok_visa",
                "items": [{"sku": "MUG-001", "quantity": 1}],
            },
        )
        assert response.status_code == 201, response.text
        status_url = f"{site}{response.json()['url']}"

        def receipt_sent() -> bool:
            return httpx.get(status_url).json()["receipt"]["status"] == "sent"

        wait_until(receipt_sent, timeout=90, interval=0.5, what="the order to complete")
        assert httpx.get(status_url).json()["payment"]["status"] == "charged"
        assert len(list((tmp_path / "var" / "mail").iterdir())) == 1
        flower = f"http://127.0.0.1:{env['FLOWER_PORT']}/"
        wait_until(lambda: answers(flower), timeout=30, what="Flower")
    finally:
        stop_make_run(proc)
    assert not answers(f"{site}/")


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is missing: `make system-deps` installs it (Debian's prometheus package)",
)
def test_make_run_with_prometheus_watches_the_shop_with_the_alert_rules(tmp_path):
    import yaml

    env = runner_env(tmp_path, free_port()) | {"PROMETHEUS_PORT": str(free_port())}
    prometheus = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"
    log = tmp_path / "run.log"
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    proc = start_make_run(env, log, "--prometheus")

    def scraped() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"make run exited early:\n{log.read_text()[-3000:]}")
        if not answers(f"{prometheus}/-/ready"):
            return False
        targets = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
        return [t["health"] for t in targets] == ["up"]

    try:
        wait_until(scraped, timeout=120, what="Prometheus scraping the shop")
        loaded = httpx.get(f"{prometheus}/api/v1/rules", params={"type": "alert"}).json()
        names = {r["name"] for group in loaded["data"]["groups"] for r in group["rules"]}
        target = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"][0]
        queues = httpx.get(
            f"{prometheus}/api/v1/query", params={"query": "jobs_queue_depth"}
        ).json()["data"]["result"]

        assert names == alerts
        assert target["scrapeUrl"] == f"http://127.0.0.1:{env['WEB_PORT']}/metrics"
        assert {q["metric"]["queue"] for q in queues} >= {"payments", "emails"}
        assert f"alerts: {prometheus}/classic/alerts" in log.read_text()
        assert answers(f"{prometheus}/classic/alerts")  # the page it links to
    finally:
        stop_make_run(proc)
    assert not answers(f"{prometheus}/-/ready")


def run_with_nothing_on_path(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """`make run ARGS=...` with an empty PATH: no redis-server, no prometheus."""
    env = runner_env(tmp_path, free_port()) | {"PATH": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "deploy/run_local.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_run_with_prometheus_but_none_installed_says_how_to_get_it(tmp_path):
    result = run_with_nothing_on_path(tmp_path, "--prometheus")

    assert result.returncode == 2
    assert "make system-deps" in result.stderr
    assert not (tmp_path / "var" / "shop.sqlite3").exists()


def test_make_run_without_redis_or_redis_server_says_how_to_get_one(tmp_path):
    result = run_with_nothing_on_path(tmp_path)

    assert result.returncode == 2
    assert "no redis-server is installed" in result.stderr
    assert "docker compose up" in result.stderr
    assert not (tmp_path / "var" / "shop.sqlite3").exists()  # stopped before doing anything
