"""Workers keep their database connection across tasks (jobs/connections.py), and still
replace one that the server closed or that is older than CONN_MAX_AGE. On a real
prefork worker: Celery's Django fixup, the behaviour changed here, only runs there."""

from functools import partial
from pathlib import Path

import pytest
from django.db import connection

from jobs import app
from jobs.models import DeadLetter
from tests.helpers import wait_until

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def runs(log: Path) -> list[int]:
    """The backend pid of every run so far."""
    return [int(pid) for pid in log.read_text().split()] if log.exists() else []


def sessions(log: Path, count: int) -> list[int]:
    """Run the task `count` more times, one after the other; every backend pid so far."""
    for _ in range(count):
        done = len(runs(log)) + 1
        app.send_task("tests.fault_tasks.database_session", args=[str(log)])
        wait_until(partial(lambda n: len(runs(log)) >= n, done), timeout=20, what=f"run {done}")
    return runs(log)


def test_a_worker_serves_its_tasks_from_one_database_connection(broker, start_worker, tmp_path):
    start_worker("default", include="tests.fault_tasks")
    pids = sessions(tmp_path / "pids", 5)

    assert len(set(pids)) == 1, pids  # Celery's fixup alone would open five


def test_a_connection_older_than_conn_max_age_is_not_reused(
    broker, start_worker, worker_env, tmp_path
):
    env = {**worker_env, "CONN_MAX_AGE": "0"}  # Django's rule: a connection per unit of work
    start_worker("default", env=env, include="tests.fault_tasks")
    pids = sessions(tmp_path / "pids", 3)

    assert len(set(pids)) == 3, pids


def test_a_connection_the_server_closed_is_replaced_before_the_next_task(
    broker, start_worker, tmp_path
):
    log = tmp_path / "pids"
    worker = start_worker("default", include="tests.fault_tasks")
    [first] = sessions(log, 1)

    # when: the server ends the worker's idle session (a restart, a failover, a timeout)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [first])

    # then: the next task runs on a new connection, first time, no retry
    second = sessions(log, 1)[1]
    worker.stop()  # its log complete

    assert second != first
    assert "retried" not in worker.log_text()
    assert not DeadLetter.objects.exists()
