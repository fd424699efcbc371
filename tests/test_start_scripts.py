"""The start scripts of deploy/bin/, run for real (the containers run them; Docker does
not run here): a worker comes up under its script, its healthcheck finds it alive, TERM
reaches Celery itself (the script execs) and stops it warmly, and then the healthcheck
says it is gone."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, role_env, wait_until

pytestmark = pytest.mark.stack

BIN = REPO / "deploy" / "bin"


@pytest.fixture
def env(worker_env: dict[str, str]) -> dict[str, str]:
    """The workers' environment as a container has it: this virtualenv's commands first on
    PATH, and the metrics folder the role's own (the script empties it)."""
    return {**role_env(worker_env), "METRICS_DIR_SHARED": ""}


def run(*args: str, env: dict[str, str]) -> int:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=REPO, env=env, capture_output=True, timeout=60
    ).returncode


def test_a_worker_under_its_script_is_alive_for_its_healthcheck_and_stops_warmly_on_term(
    broker, env, tmp_path
):
    log = (tmp_path / "worker.log").open("wb")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "counter_4242.db").write_bytes(b"from before a restart")
    worker = subprocess.Popen(
        [str(BIN / "worker"), "default", "--concurrency", "1", "--without-mingle"],
        cwd=REPO,
        env={**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
        stdout=log,
        stderr=log,
    )
    try:
        wait_until(lambda: run("worker-alive", "default", env=env) == 0, timeout=60)
        assert not (metrics / "counter_4242.db").exists()  # the script emptied the folder
        # the script exec'd: the container's main process is Celery, not a shell
        cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().split(b"\0")
        assert b"celery" in cmdline[1]
        assert b"bash" not in cmdline[0]

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "Warm shutdown" in (tmp_path / "worker.log").read_text()
    assert run("worker-alive", "default", env=env) != 0


def test_the_http_healthcheck_passes_on_an_answering_service_only(gateway_process, env):
    assert run("http-ok", f"{gateway_process.url}/healthz", env=env) == 0
    assert run("http-ok", f"http://127.0.0.1:{free_port()}/healthz", env=env) != 0


def test_a_start_script_without_its_argument_is_a_usage_error(env):
    result = subprocess.run(
        [str(BIN / "worker")], cwd=REPO, env=env, capture_output=True, text=True
    )

    assert result.returncode != 0
    assert "usage: deploy/bin/worker <queue>" in result.stderr


@pytest.mark.parametrize(
    ("script", "port_variable", "path"),
    [
        ("web", "WEB_PORT", "/healthz"),
        ("gateway", "GATEWAY_PORT", "/healthz"),
        ("flower", "FLOWER_PORT", "/healthcheck"),
    ],
)
def test_an_http_role_under_its_script_passes_its_healthcheck_and_stops_on_term(
    script, port_variable, path, broker, env, tmp_path
):
    port = free_port()
    role_env = {**env, port_variable: str(port), "SHOP_VAR_DIR": str(tmp_path)}
    role_env["FLOWER_BASIC_AUTH"] = "ops:secret"
    log = (tmp_path / f"{script}.log").open("wb")
    process = subprocess.Popen([str(BIN / script)], cwd=REPO, env=role_env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}{path}"
        wait_until(lambda: run("http-ok", url, env=env) == 0, timeout=60, what=url)

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert run("http-ok", url, env=env) != 0


def test_beat_under_its_script_is_alive_for_its_healthcheck_and_stops_on_term(
    broker, env, tmp_path
):
    beat_env = {**env, "SHOP_VAR_DIR": str(tmp_path)}
    log = (tmp_path / "beat.log").open("wb")
    assert run("beat-alive", env=beat_env) != 0  # no schedule saved yet
    beat = subprocess.Popen([str(BIN / "beat")], cwd=REPO, env=beat_env, stdout=log, stderr=log)
    try:
        wait_until(lambda: run("beat-alive", env=beat_env) == 0, timeout=60, what="beat's schedule")
        # Its schedule file is written while beat still sets up (its result backend is
        # imported then); TERM in that moment ends it with an error. TERM a running beat:
        # one that has sent its first due task.
        wait_until(
            lambda: "Sending due task" in (tmp_path / "beat.log").read_text(),
            timeout=60,
            what="beat's first due task",
        )
        beat.send_signal(signal.SIGTERM)
        assert beat.wait(timeout=30) == 0
    finally:
        if beat.poll() is None:
            beat.kill()
    # a schedule nobody saved for longer than the liveness window: not alive
    for schedule in tmp_path.glob("celerybeat-schedule*"):
        os.utime(schedule, (time.time() - 600, time.time() - 600))
    assert run("beat-alive", env=beat_env) != 0


@pytest.mark.parametrize(("shared", "left"), [("", False), ("1", True)])
def test_a_role_empties_its_metrics_folder_unless_its_launcher_shares_it(
    shared, left, env, tmp_path
):
    (tmp_path / "counter_4242.db").write_bytes(b"another running role's counts")
    role_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "METRICS_DIR_SHARED": shared}
    subprocess.run(
        ["bash", "-c", f"source {BIN / 'metrics-dir'}"], env=role_env, check=True, timeout=30
    )

    assert (tmp_path / "counter_4242.db").exists() is left


def test_flower_without_a_password_refuses_to_listen_beyond_this_machine(env, tmp_path):
    result = subprocess.run(
        [str(BIN / "flower")],
        cwd=REPO,
        env={
            **env,
            "LISTEN_HOST": "0.0.0.0",  # noqa: S104  (what it refuses)
            "FLOWER_BASIC_AUTH": "",
            "SHOP_VAR_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "set FLOWER_BASIC_AUTH=user:password (Flower listens on 0.0.0.0)" in result.stderr
