"""`make run`'s stack on the embedded default (SQLite) serves the shop and completes an
order; without Redis it starts a private one, or stops with a message saying what to do."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, free_port, wait_until

pytestmark = pytest.mark.stack


def runner_env(tmp_path: Path, broker_port: int) -> dict[str, str]:
    # the embedded default: no DATABASE_URL, and the real settings module, not the tests'
    env = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    gateway_port = free_port()
    env.update(
        SHOP_VAR_DIR=str(tmp_path / "var"),
        WEB_PORT=str(free_port()),
        FLOWER_PORT=str(free_port()),
        GATEWAY_PORT=str(gateway_port),
        PAYMENT_GATEWAY_URL=f"http://127.0.0.1:{gateway_port}",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{broker_port}/0",
        CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT="1",
    )
    return env


def start_make_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`make run`'s launcher in a session of its own (as a terminal would run it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "deploy/run_local.py"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_make_run(proc: subprocess.Popen[bytes]) -> None:
    """One Ctrl-C stops everything; raises if it did not within a minute."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


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


def test_make_run_without_redis_or_redis_server_says_how_to_get_one(tmp_path):
    env = runner_env(tmp_path, free_port()) | {"PATH": str(tmp_path)}  # no redis-server

    result = subprocess.run(
        [sys.executable, "deploy/run_local.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "no redis-server is installed" in result.stderr
    assert "docker compose up" in result.stderr
    assert not (tmp_path / "var" / "shop.sqlite3").exists()  # stopped before doing anything
