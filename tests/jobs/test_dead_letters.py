"""Terminal failures on a real prefork worker end as exactly one dead letter with the
right reason; failures that heal end as none. Test workers retry 3 times, 0.1-0.4 s apart.
"""

import itertools
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery.signals import task_failure
from django.db import connection, connections
from django.utils import timezone
from prometheus_client import REGISTRY

from jobs.dead_letters import (
    _on_task_failure,
    dead_letter_record,
    dead_letter_replay,
    dead_letter_unpublishable,
)
from jobs.errors import PermanentError
from jobs.models import DeadLetter, OutboxMessage
from tests.helpers import Worker, WorkerStarter, attempts, dead_letter, send, wait_until

pytestmark = pytest.mark.django_db(transaction=True)  # stack: the tests taking a worker

MAX_RETRIES = 3  # RETRY_MAX_RETRIES in the worker environment


@pytest.fixture(scope="module")
def fault_worker(worker_env: dict[str, str], worker_logs: Path) -> Iterator[Worker]:
    """One worker for the module's tests (`start_worker` starts one per test)."""
    with WorkerStarter(worker_env, worker_logs) as start:
        yield start("default", include="tests.fault_tasks")


def test_a_deferred_call_spends_no_retry(fault_worker, tmp_path):
    log = tmp_path / "attempts"

    # Held back more often than the retries allow: each deferral is the same attempt.
    task_id = send("defer_until", str(log), MAX_RETRIES + 2)

    wait_until(lambda: fault_worker.succeeded(task_id), timeout=30, what="the task to succeed")
    assert len(attempts(log)) == MAX_RETRIES + 3
    deferred = [e for e in fault_worker.events("deferred") if e["task_id"] == task_id]
    assert len(deferred) == MAX_RETRIES + 2
    assert {(e["attempt"], e["dependency"], e["reason"]) for e in deferred} == {
        (1, "svc", "rate_limited")
    }
    assert not [e for e in fault_worker.events("retried") if e["task_id"] == task_id]
    assert not DeadLetter.objects.filter(task_id=task_id).exists()


def test_a_transient_failure_that_heals_is_retried_with_backoff_and_leaves_no_dead_letter(
    fault_worker, tmp_path
):
    log = tmp_path / "attempts"

    task_id = send("fail_until", str(log), 2)

    wait_until(lambda: fault_worker.succeeded(task_id), timeout=30, what="the task to succeed")
    times = attempts(log)
    assert len(times) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Each retry waited at least half its ceiling (0.1 s * 2**n, equal jitter), in the
    # broker: the next attempt cannot start sooner, however busy the machine.
    assert all(gap >= 0.1 * 2**n / 2 for n, gap in enumerate(gaps)), gaps
    assert not DeadLetter.objects.exists()


def test_retries_exhausted_give_exactly_one_dead_letter(fault_worker, tmp_path):
    log = tmp_path / "attempts"

    task_id = send("fail_until", str(log), 99)

    letter = dead_letter(task_id)
    assert letter.reason == DeadLetter.Reason.RETRIES_EXHAUSTED
    assert letter.attempts == MAX_RETRIES + 1 == len(attempts(log))
    assert letter.exception_class == "jobs.errors.TransientError"
    assert "attempt 4 of a flaky dependency" in letter.exception_message
    assert "Traceback" in letter.traceback
    assert "fail_until" in letter.traceback
    assert (letter.task_name, letter.queue, letter.args) == (
        "tests.fault_tasks.fail_until",
        "default",
        [str(log), 99],
    )
    assert letter.status == DeadLetter.Status.DEAD
    assert DeadLetter.objects.count() == 1


def test_a_bug_is_retried_within_bounds_then_dead_lettered(fault_worker, tmp_path):
    log = tmp_path / "attempts"

    letter = dead_letter(send("bug", str(log)))

    assert letter.reason == DeadLetter.Reason.RETRIES_EXHAUSTED
    assert letter.exception_class == "builtins.ZeroDivisionError"
    assert len(attempts(log)) == MAX_RETRIES + 1


def test_a_permanent_error_is_dead_lettered_at_once(fault_worker, tmp_path):
    log = tmp_path / "attempts"

    letter = dead_letter(send("refuse", str(log)))

    assert letter.reason == DeadLetter.Reason.PERMANENT_ERROR
    assert letter.attempts == 1
    assert len(attempts(log)) == 1  # no retry budget burnt


def test_the_hard_time_limit_gives_a_time_limit_dead_letter(fault_worker, tmp_path):
    log = tmp_path / "attempts"

    letter = dead_letter(send("overrun", str(log)))

    assert letter.reason == DeadLetter.Reason.TIME_LIMIT
    assert letter.exception_class.endswith("TimeLimitExceeded")
    assert len(attempts(log)) == 1
    assert fault_worker.proc is not None
    assert fault_worker.proc.poll() is None


def test_a_child_killed_once_is_redelivered_and_completes_once(fault_worker, tmp_path):
    log, done = tmp_path / "attempts", tmp_path / "done"

    task_id = send("die", str(log), 1, str(done))

    wait_until(
        lambda: fault_worker.succeeded(task_id),
        timeout=30,
        what="the task to succeed after its child was killed",
    )
    assert len(attempts(log)) == 2
    assert done.read_text() == "done\n"
    assert not DeadLetter.objects.exists()


def test_a_child_killed_every_time_ends_as_a_worker_lost_dead_letter(fault_worker, tmp_path):
    log, done = tmp_path / "attempts", tmp_path / "done"

    headers = {"x_correlation_id": "req-lost"}
    letter = dead_letter(send("die", str(log), 99, str(done), headers=headers), timeout=60)

    assert letter.reason == DeadLetter.Reason.WORKER_LOST
    assert letter.correlation_id == "req-lost"  # carried through the worker-lost retries
    assert letter.exception_class.endswith("WorkerLostError")
    assert len(attempts(log)) == MAX_RETRIES + 1  # bounded, not a loop
    assert not done.exists()


def test_a_replay_that_fails_again_marks_its_original_failed(fault_worker, tmp_path):
    import tests.fault_tasks  # noqa: F401  a replay re-sends only the tasks this process knows

    log = tmp_path / "attempts"
    original = dead_letter(send("refuse", str(log)))

    # when: an operator replays it, and the replay fails for good too
    assert dead_letter_replay(ids=[original.pk], actor="ops").done == 1
    original.refresh_from_db()
    again = dead_letter(original.replay_task_id)

    # then: the replay is a dead letter of its own, linked to the original, and the
    # original says its replay failed (not `pending` for ever)
    assert (again.reason, again.replay_of) == (DeadLetter.Reason.PERMANENT_ERROR, original.task_id)
    wait_until(
        lambda: DeadLetter.objects.get(pk=original.pk).replay_outcome == DeadLetter.Outcome.FAILED,
        timeout=30,
        what="the original's replay outcome",
    )
    assert DeadLetter.objects.get(pk=original.pk).status == DeadLetter.Status.REPLAYED
    assert len(attempts(log)) == 2
    assert DeadLetter.objects.count() == 2


def record_failure(task_id: str) -> DeadLetter:
    from shop.tasks.payments import charge_payment as task

    return dead_letter_record(
        task=task,
        task_id=task_id,
        exception=PermanentError("declined"),
        args=[1],
        kwargs={},
        traceback="Traceback ...",
    )


def test_recording_the_same_failure_twice_writes_one_row_and_refreshes_its_last_failure():
    task_id = str(uuid.uuid4())
    record_failure(task_id)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    DeadLetter.objects.update(first_failed_at=an_hour_ago, last_failed_at=an_hour_ago)

    # when: the failure is signalled again (a redelivered message fails once more)
    before = timezone.now()
    record_failure(task_id)

    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.queue) == (DeadLetter.Reason.PERMANENT_ERROR, "payments")
    assert letter.first_failed_at == an_hour_ago
    assert letter.last_failed_at >= before


def test_a_dead_letter_keeps_5000_characters_of_the_message_and_50000_of_the_traceback():
    from shop.tasks.payments import charge_payment as task

    letter = dead_letter_record(
        task=task,
        task_id=str(uuid.uuid4()),
        exception=PermanentError("m" * 6000),
        args=[1],
        kwargs={},
        traceback="t" * 60_000,
    )

    letter.refresh_from_db()
    assert (len(letter.exception_message), len(letter.traceback)) == (5000, 50_000)
    assert letter.exception_class == "jobs.errors.PermanentError"
    assert letter.attempts == 1  # the first run failed: retries 0


def test_an_unpublishable_row_becomes_a_dead_letter_with_its_headers_and_failures():
    message = OutboxMessage.objects.create(
        task_name="shop.tasks.payments.charge_payment",
        args=[7],
        kwargs={},
        headers={"x_correlation_id": "c-1", "replay_of": "t-0"},
        failures=4,
    )

    labels = {"task": message.task_name, "queue": "", "reason": "unpublishable"}

    def total() -> float:
        return REGISTRY.get_sample_value("jobs_dead_letters_total", labels) or 0

    before = total()

    def counted() -> float:
        return total() - before

    letter = dead_letter_unpublishable(message=message, error="e" * 6000)
    assert counted() == 1
    again = dead_letter_unpublishable(message=message, error="e")  # a relay run after a crash
    assert (again.pk, counted()) == (letter.pk, 1)  # one row, counted once
    letter.refresh_from_db()
    assert (letter.task_id, letter.reason) == (str(message.task_id), "unpublishable")
    assert (letter.attempts, len(letter.exception_message)) == (5, 5000)
    assert (letter.correlation_id, letter.replay_of) == ("c-1", "t-0")


def drop_this_connection() -> None:
    """The database ends this thread's session, as a restart or a failover would."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:  # and waits (up to 10 s) until it has ended
            cursor.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])
    finally:
        other.close()


def test_the_failure_receiver_survives_a_database_error_and_records_the_next_failure(caplog):
    from shop.tasks.payments import charge_payment as task

    lost, recorded = str(uuid.uuid4()), str(uuid.uuid4())

    def fail(task_id: str) -> list[object]:
        responses = task_failure.send(
            sender=task, task_id=task_id, exception=PermanentError("declined"), args=[1]
        )
        return [response for receiver, response in responses if receiver is _on_task_failure]

    # when: a task fails while the database has just dropped the connection
    drop_this_connection()
    assert fail(lost) == [None]  # the receiver raised nothing: the worker goes on

    # then: the error is logged, the broken connection is closed, and the next failure
    # is recorded on a new one
    assert f"could not record {task.name}[{lost}]" in caplog.text
    assert fail(recorded) == [None]
    assert list(DeadLetter.objects.values_list("task_id", flat=True)) == [recorded]
