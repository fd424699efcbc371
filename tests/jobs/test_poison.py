"""The poison guard: a message that kills its whole worker is redelivered by Redis after
the visibility timeout, forever, unless something counts. On real worker processes (no
other worker consumes `default` meanwhile); and, in this process, a guard that cannot
count (Redis failing, a broker that is not Redis) lets the task run."""

import logging

import pytest

from jobs import broker
from jobs.celery import app
from jobs.checks import poison_check, refuse_to_start_with_a_redelivery_loop
from jobs.models import DeadLetter
from tests.helpers import (
    RedisServer,
    attempts,
    dead_letter,
    free_port,
    own_task,
    run_as_delivered,
    send,
    wait_until,
)


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_a_message_that_kills_its_whole_worker_every_time_is_dead_lettered_as_poison(
    start_worker, worker_env, redis_server, tmp_path
):
    log = tmp_path / "attempts"
    env = worker_env | {"POISON_MAX_DELIVERIES": "2"}
    task_id = send("hang", str(log))

    # when: every worker that takes the message dies with it (as in an OOM kill)
    for delivery in (1, 2):
        worker = start_worker("default", env=env, include="tests.fault_tasks", ready=False)
        wait_until(lambda: len(attempts(log)) == delivery, timeout=60, what="the task")  # noqa: B023
        worker.kill()
        assert redis_server.restore_unacked() == 1  # what the visibility timeout would do
    start_worker("default", env=env, include="tests.fault_tasks", ready=False)
    letter = dead_letter(task_id, timeout=60)

    # then: the third delivery did not run it; the loop ended with a dead letter
    assert letter.reason == DeadLetter.Reason.POISON
    assert letter.exception_class == "jobs.errors.PoisonMessage"
    assert len(attempts(log)) == 2
    wait_until(lambda: redis_server.unacked() == 0, timeout=10, what="the ack")
    assert redis_server.queue_lengths()["default"] == 0


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_the_guard_keeps_nothing_in_redis_for_tasks_that_finished(start_worker, broker, tmp_path):
    from jobs import app

    # given: no counts left by earlier tests (a killed delivery's stays, by design: its
    # TTL is the backstop), and a few thousand tasks, some of them retried once
    redis_server = broker
    if leftovers := list(redis_server.client().scan_iter("jobs:deliveries:*")):
        redis_server.client().delete(*leftovers)
    with app.producer_or_acquire() as producer:
        for _ in range(2000):
            app.send_task("tests.fault_tasks.noop", producer=producer)
    flaky = [send("fail_until", str(tmp_path / f"flaky-{n}"), 1) for n in range(20)]

    # when: they all ran
    worker = start_worker("default", concurrency=2, include="tests.fault_tasks")
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
    worker.stop()  # before looking: no worker left to count or forget a delivery

    # then: the guard's counts went with them
    assert len(set(flaky)) == 20
    assert list(redis_server.client().scan_iter("jobs:deliveries:*")) == []


def broker_at(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's broker is `url` (and its Redis client is made afresh for it). The
    environment, as a deployment sets it: Celery reads CELERY_BROKER_URL before its conf."""
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    assert app.conf.broker_url == url
    monkeypatch.setattr(broker, "_clients", {})


def test_a_broker_redis_that_fails_leaves_the_task_to_run_uncounted(monkeypatch, caplog):
    runs: list[int] = []

    def run() -> str:
        runs.append(1)
        return "done"

    task = own_task(run=staticmethod(run))
    broker_at(f"redis://127.0.0.1:{free_port()}/0", monkeypatch)  # nothing listens there

    with caplog.at_level(logging.WARNING, logger="jobs.poison"):
        result = run_as_delivered(task, task_id="t-1")

    assert (result, runs) == ("done", [1])  # the guard never fails a task
    assert "poison guard: could not count delivery of t-1" in caplog.text
    assert "poison guard: could not forget delivery of t-1" in caplog.text


def test_on_a_broker_that_is_not_redis_the_guard_counts_nothing_and_the_task_runs(
    redis_server: RedisServer, monkeypatch, caplog
):
    counted: list[int] = []

    def run() -> str:
        # This delivery's own key: other tests leave the counts of deliveries that died.
        counted.append(redis_server.client().exists("jobs:deliveries:t-amqp:0"))
        return "done"

    task = own_task(run=staticmethod(run))
    # RabbitMQ bounds redeliveries itself (a quorum queue's delivery-limit)
    broker_at("amqp://guest:guest@127.0.0.1:5672//", monkeypatch)

    with caplog.at_level(logging.WARNING, logger="jobs.poison"):
        result = run_as_delivered(task, task_id="t-amqp")

    assert (result, counted) == ("done", [0])
    # nothing failed: there is nothing to count in
    assert [record for record in caplog.records if record.name == "jobs.poison"] == []


def test_a_delivery_is_counted_for_as_long_as_its_redeliveries_can_come_back(redis_server):
    """The count must outlive the visibility timeout times the deliveries allowed, or a
    message that kills its worker every time would start again from zero, for ever."""
    from jobs.celery import visibility_timeout
    from jobs.conf import jobs_settings
    from jobs.poison import delivery_count

    key = "jobs:deliveries:t-ttl:0"
    redis_server.client().delete(key)

    assert [delivery_count("t-ttl", 0) for _ in range(2)] == [1, 2]

    expected = visibility_timeout() * (jobs_settings.POISON_MAX_DELIVERIES + 1)
    assert expected - 5 <= redis_server.client().ttl(key) <= expected
    redis_server.client().delete(key)


@pytest.mark.parametrize("allowed", [5, 1], ids=["shipped", "one"])
def test_the_check_passes_a_delivery_limit_of_one_or_more(settings, allowed):
    settings.JOBS_POISON_MAX_DELIVERIES = allowed

    assert poison_check() == []


@pytest.mark.parametrize("allowed", [0, -1, "5", None, True], ids=repr)
def test_the_check_refuses_a_delivery_limit_that_would_dead_letter_every_task(settings, allowed):
    settings.JOBS_POISON_MAX_DELIVERIES = allowed

    [error] = poison_check()

    assert error.id == "jobs.E006"
    assert repr(allowed) in error.msg


def test_workers_and_beat_refuse_to_start_with_a_delivery_limit_below_one(settings, capsys):
    settings.JOBS_POISON_MAX_DELIVERIES = 0

    with pytest.raises(SystemExit):
        refuse_to_start_with_a_redelivery_loop()

    assert "jobs.E006" in capsys.readouterr().err


def test_a_task_called_directly_is_no_delivery_and_is_never_counted(monkeypatch):
    from tests.fault_tasks import noop

    def counted(*args: object) -> int:
        raise AssertionError("a direct call was counted as a delivery")

    monkeypatch.setattr("jobs.base.delivery_count", counted)
    monkeypatch.setattr("jobs.base.delivery_finished", counted)

    assert noop() is None  # ran, in this process, with no message to count
