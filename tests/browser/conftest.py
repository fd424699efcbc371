"""A real browser (Debian's Chromium, driven by Playwright; no browser download) against
the stack `make run` starts: web, gateway, one worker per queue, beat and Flower on the
embedded SQLite database and a private Redis."""

import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, free_port, wait_until
from tests.test_make_run import answers, runner_env, start_make_run, stop_make_run

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "var" / "screenshots"
# Debian's Chromium, as root, on a machine without a network beyond the registries.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session", autouse=True)
def _chromium_installed() -> None:
    """No Chromium is a failure, not a skip: `make test` installs it (`make system-deps`),
    so a browser test that could not run never passes for one that did."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM}: `make system-deps` installs it "
            "(apt-get install chromium)",
            pytrace=False,
        )


@dataclass
class Shop:
    site: str
    gateway: str
    var: Path
    admin_user: str
    admin_password: str
    env: dict[str, str]

    def manage(self, *args: str) -> str:
        """`manage.py` against the stack's own database."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    def mails(self) -> list[Path]:
        folder = self.var / "mail"
        return sorted(folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="package")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    tmp_path = tmp_path_factory.mktemp("make-run")
    env = runner_env(tmp_path, free_port())
    env["RETRY_BACKOFF_BASE"], env["RETRY_BACKOFF_CAP"] = "0.2", "1"  # quick retries
    env["RETRY_MAX_RETRIES"], env["RETRY_OUTAGE_BUDGET"] = "5", "0"
    site = f"http://127.0.0.1:{env['WEB_PORT']}"
    log = tmp_path / "run.log"
    proc = start_make_run(env, log)
    try:
        wait_until(lambda: answers(f"{site}/"), timeout=120, what="the shop to answer")
        gateway = env["PAYMENT_GATEWAY_URL"]
        wait_until(lambda: answers(f"{gateway}/healthz"), timeout=30, what="the gateway")
        login = re.search(r"user: (\S+)\s+password: (\S+)", log.read_text())
        assert login, log.read_text()[-2000:]
        yield Shop(site, gateway, tmp_path / "var", login.group(1), login.group(2), env)
    finally:
        stop_make_run(proc)


@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):  # a fresh context: its own cookies, so its own cart
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


def screenshot(page, name: str) -> Path:
    """Save the page under var/screenshots/ (the README shows some of them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def gateway_control(shop: Shop, **settings: object) -> None:
    httpx.post(f"{shop.gateway}/v1/control", json=settings, timeout=10).raise_for_status()


def dead_letter_count(shop: Shop, reason: str = "") -> int:
    """Dead letters waiting for an operator (of one reason, if given), read from the
    stack's SQLite database."""
    query = "SELECT count(*) FROM jobs_deadletter WHERE status = 'dead'"
    query += " AND reason = ?" if reason else ""
    with closing(sqlite3.connect(shop.var / "shop.sqlite3", timeout=10)) as db:
        return int(db.execute(query, (reason,) if reason else ()).fetchone()[0])


def create_dead_letters(shop: Shop, reason: str, count: int) -> None:
    """Dead letters of the test's own (a receipt task's, with nothing to replay): a test
    never relies on the ones another test left."""
    shop.manage(
        "shell",
        "-c",
        "import uuid; from jobs.models import DeadLetter; "
        "DeadLetter.objects.bulk_create(DeadLetter(task_id=str(uuid.uuid4()), "
        f"task_name='shop.tasks.emails.send_receipt', reason={reason!r}) "
        f"for _ in range({count}))",
    )


def log_in(page, shop: Shop, user: str, password: str) -> None:
    page.goto(f"{shop.site}/admin/login/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{shop.site}/admin/")
