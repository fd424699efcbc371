"""Tasks that fail on purpose, loaded only into test workers (`celery worker -I`).

Each run appends a line to a file the test gives, so the test counts attempts on an
external witness, not in the task's own bookkeeping.
"""

import os
import signal
import time
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection

from jobs.base import ReliableTask
from jobs.dependencies import Deferred
from jobs.errors import PermanentError, TransientError


def _attempt(path: str) -> int:
    with Path(path).open("a") as log:
        log.write(f"{time.time()}\n")
    return len(Path(path).read_text().splitlines())


@shared_task(name="tests.fault_tasks.fail_until", base=ReliableTask)
def fail_until(path: str, failures: int) -> int:
    attempt = _attempt(path)
    if attempt <= failures:
        raise TransientError(f"attempt {attempt} of a flaky dependency")
    return attempt


@shared_task(name="tests.fault_tasks.defer_until", base=ReliableTask)
def defer_until(path: str, deferrals: int) -> int:
    """Held back by a dependency's limit `deferrals` times (its call never made), then done."""
    attempt = _attempt(path)
    if attempt <= deferrals:
        raise Deferred("svc", "rate_limited", 0.1)
    return attempt


@shared_task(name="tests.fault_tasks.refuse", base=ReliableTask)
def refuse(path: str) -> None:
    _attempt(path)
    raise PermanentError("this input can never work")


@shared_task(name="tests.fault_tasks.bug", base=ReliableTask)
def bug(path: str) -> float:
    _attempt(path)
    return 1 / 0


@shared_task(name="tests.fault_tasks.overrun", base=ReliableTask, soft_time_limit=1, time_limit=2)
def overrun(path: str) -> None:
    _attempt(path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # ignores the soft limit: only the hard one stops it
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            continue


@shared_task(name="tests.fault_tasks.die", base=ReliableTask)
def die(path: str, deaths: int, done: str) -> int:
    """SIGKILL its own pool child on the first `deaths` attempts, then finish."""
    attempt = _attempt(path)
    if attempt <= deaths:
        os.kill(os.getpid(), signal.SIGKILL)
    with Path(done).open("a") as log:
        log.write("done\n")
    return attempt


@shared_task(name="tests.fault_tasks.hang", base=ReliableTask)
def hang(path: str) -> None:
    """Log the attempt, then hang until the test kills the whole worker."""
    _attempt(path)
    time.sleep(30)


@shared_task(name="tests.fault_tasks.slow", base=ReliableTask)
def slow(path: str, seconds: float) -> None:
    """Log the start, work for `seconds`, log the end."""
    _attempt(path)
    time.sleep(seconds)
    with Path(path).open("a") as log:
        log.write("finished\n")


@shared_task(name="tests.fault_tasks.database_session", base=ReliableTask)
def database_session(path: str) -> int:
    """Log which PostgreSQL session (backend pid) served this task."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = int(cursor.fetchone()[0])
    with Path(path).open("a") as log:
        log.write(f"{pid}\n")
    return pid


@shared_task(name="tests.fault_tasks.noop", base=ReliableTask, ignore_result=True)
def noop() -> None:
    """Does nothing: many of them show what a task leaves behind in the broker."""
