"""A real browser (Debian's Chromium, driven by Playwright; no browser download) against
the stack `make run` starts: web, gateway, one worker per queue, beat and Flower on the
embedded SQLite database and a private Redis."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Shop,
    answers,
    free_port,
    runner_env,
    start_make_run,
    stop_make_run,
    wait_until,
)

CHROMIUM = Path("/usr/bin/chromium")
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


@pytest.fixture
def other_page(browser):  # someone else at the same time (the shopper beside the operator)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()  # its page stops polling the stack
