"""Flower, started the way `make run` and compose start it, refuses requests without
credentials and is read-only by default."""

import subprocess

import httpx
import pytest

from tests.helpers import BIN, REPO, free_port, role_env, wait_until

pytestmark = pytest.mark.stack


def test_flower_needs_credentials_and_is_read_only(redis_server, tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "shop.settings",  # as make run and the image set it
        "CELERY_BROKER_URL": redis_server.url,
        "SHOP_VAR_DIR": str(tmp_path),
        "FLOWER_BASIC_AUTH": "ops:s3cret",
        "FLOWER_COOKIE_SECRET": "test-cookie-secret",
        "FLOWER_READ_ONLY": "true",
    }
    flower = subprocess.Popen(
        [str(BIN / "flower")],
        cwd=REPO,
        env={**role_env(env), "FLOWER_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=30, what="Flower")

        anonymous = httpx.get(f"{url}/", timeout=5)
        wrong = httpx.get(f"{url}/", auth=("ops", "guess"), timeout=5)
        allowed = httpx.get(f"{url}/", auth=("ops", "s3cret"), timeout=5)
        shutdown = httpx.post(
            f"{url}/api/worker/shutdown/nobody@nowhere", auth=("ops", "s3cret"), timeout=5
        )
    finally:
        flower.terminate()
        flower.wait(timeout=10)

    assert (anonymous.status_code, wrong.status_code, allowed.status_code) == (401, 401, 200)
    assert shutdown.status_code == 403  # read-only: no control operations
