"""The poison guard on real worker processes: a message that kills its whole worker is
redelivered by Redis after the visibility timeout, forever, unless something counts.
No other worker consumes `default` while this module runs."""

import pytest

from jobs.models import DeadLetter
from tests.jobs.test_dead_letters import attempts, dead_letter, send
from tests.processes import Worker, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def test_a_message_that_kills_its_whole_worker_every_time_is_dead_lettered_as_poison(
    worker_env, worker_logs, redis_server, tmp_path
):
    log = tmp_path / "attempts"
    env = worker_env | {"POISON_MAX_DELIVERIES": "2"}
    task_id = send("hang", str(log))

    # when: every worker that takes the message dies with it (as in an OOM kill)
    for delivery in (1, 2):
        worker = Worker("default", env, worker_logs, include="tests.fault_tasks").start()
        wait_until(lambda: len(attempts(log)) == delivery, timeout=60, what="the task")  # noqa: B023
        worker.kill()
        assert redis_server.restore_unacked() == 1  # what the visibility timeout would do
    last = Worker("default", env, worker_logs, include="tests.fault_tasks").start()
    try:
        letter = dead_letter(task_id, timeout=60)
        # then: the third delivery did not run it; the loop ended with a dead letter
        assert letter.reason == DeadLetter.Reason.POISON
        assert letter.exception_class == "jobs.errors.PoisonMessage"
        assert len(attempts(log)) == 2
        wait_until(lambda: redis_server.unacked() == 0, timeout=10, what="the ack")
        assert redis_server.queue_lengths()["default"] == 0
    finally:
        last.stop()


def test_the_guard_keeps_nothing_in_redis_for_tasks_that_finished(
    worker_env, worker_logs, redis_server, tmp_path
):
    from jobs import app

    # given: a few thousand tasks, some of them retried once
    with app.producer_or_acquire() as producer:
        for _ in range(2000):
            app.send_task("tests.fault_tasks.noop", producer=producer)
    flaky = [send("fail_until", str(tmp_path / f"flaky-{n}"), 1) for n in range(20)]
    worker = Worker("default", worker_env, worker_logs, concurrency=2, include="tests.fault_tasks")
    try:
        # when: they all ran
        worker.start().wait_ready()
        wait_until(
            lambda: redis_server.queue_lengths()["default"] == 0 and redis_server.unacked() == 0,
            timeout=120,
            what="the queue drained",
        )
        wait_until(
            lambda: all(len(attempts(tmp_path / f"flaky-{n}")) == 2 for n in range(20)),
            timeout=30,
            what="every flaky task retried once",
        )
        wait_until(lambda: redis_server.unacked() == 0, timeout=30, what="the retries acked")
    finally:
        worker.stop()

    # then: the guard's counts went with them
    assert len(set(flaky)) == 20
    assert list(redis_server.client().scan_iter("jobs:deliveries:*")) == []
