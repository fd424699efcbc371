"""`jobs` lifted into another project: tests/liftproject (its own settings, one model,
two tasks, nothing of the shop) installs it and, on a real worker process, enqueues
through the outbox, retries, dead-letters, replays from the admin, and serves /metrics
and /readyz. Every step runs in a process of the lift project's own."""

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RedisServer, run_module, wait_until

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def lift_env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    import psycopg

    name = f"lift_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    server = "postgres://postgres@127.0.0.1:5432"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "DATABASE_URL", "RETRY_", "OUTBOX_"))
    }
    env |= {
        "DJANGO_SETTINGS_MODULE": "tests.liftproject.settings",
        "LIFT_DATABASE_URL": f"{server}/{name}",
        "CELERY_BROKER_URL": redis_server.url,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("lift-metrics")),
    }
    try:
        migrated = run_module("django", "migrate", "--noinput", "-v", "0", env=env, timeout=120)
        assert migrated.returncode == 0, migrated.stderr[-3000:]
        yield env
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def step(env: dict[str, str], name: str) -> Any:
    result = run_module("tests.liftproject.drive", name, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_jobs_lifted_into_another_project_works_end_to_end(lift_env, start_worker, tmp_path: Path):
    worker = start_worker("lift", env=lift_env, log_dir=tmp_path)

    # enqueued through the outbox: one task succeeds, one keeps failing
    step(lift_env, "enqueue")
    dead = wait_until(
        lambda: (s := step(lift_env, "state"))["dead_letters"] and s,
        timeout=60,
        what="the failing task's dead letter",
    )
    assert dead["outbox_unsent"] == 0  # published after commit, no relay needed
    assert dead["greetings"]["ada"] == {"greeted": True, "attempts": 0}
    assert dead["greetings"]["bob"] == {"greeted": False, "attempts": 3}  # 1 + 2 retries
    [letter] = dead["dead_letters"]
    assert (letter["task"], letter["reason"], letter["status"]) == (
        "lift.greet_when_ready",
        "retries_exhausted",
        "dead",
    )

    # an operator fixes the cause and replays it from the admin
    replay = step(lift_env, "replay")
    assert replay["status"] == 200
    assert replay["replayed_message"]
    assert (replay["index"], replay["operations_linked"], replay["operations"]) == (
        200,
        True,
        200,
    )
    done = wait_until(
        lambda: (s := step(lift_env, "state"))["greetings"]["bob"]["greeted"] and s,
        timeout=60,
        what="the replayed task",
    )
    assert [d["status"] for d in done["dead_letters"]] == ["replayed"]
    worker.stop()

    probes = step(lift_env, "probes")
    assert (probes["readyz"], probes["healthz"], probes["metrics"]) == (200, 200, 200)
    assert probes["admin_by_ip"] == 400  # probes answer any host; the rest validates it
    assert probes["checks"] == []
    # the host's one transport option, and jobs' others beside it
    assert probes["transport"]["visibility_timeout"] == 7200
    assert probes["transport"]["socket_timeout"] == 15.0
    assert probes["transport"]["health_check_interval"] == 25
    assert any('task="lift.greet"' in line for line in probes["succeeded"]), probes
    assert any('task="lift.greet_when_ready"' in line for line in probes["succeeded"]), probes
    assert probes["shop_imported"] is False
    # jobs schedules its own periodic work and brings the settings its guarantees rest on
    assert probes["beat_schedule"] == [
        "canary-lift",
        "prune-dead-letters",
        "prune-outbox",
        "reconcile",
        "relay-outbox",
    ]
    assert probes["acks_late"] is True
