"""The outbox: rows written with the transaction, published after it, relayed when the
publish did not happen, never double-published by two relays."""

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from types import SimpleNamespace

import pytest
from celery.app.routes import Router, prepare
from celery.exceptions import QueueNotFound, SoftTimeLimitExceeded
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection, transaction
from django.db.models import QuerySet
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from kombu import Connection
from kombu.exceptions import EncodeError

from jobs import app, outbox
from jobs.celery import beat_entries
from jobs.checks import outbox_check
from jobs.models import DeadLetter, OutboxMessage
from jobs.tasks import prune_outbox as prune_outbox_task
from jobs.tasks import relay_outbox as relay_outbox_task
from tests.helpers import run_concurrently, wait_until

TASK = "shop.tasks.payments.charge_payment"


def published_task_ids(broker) -> list[str]:
    """The task ids in `payments`, as they are (the publishing thread is not waited for)."""
    raw = broker.client().lrange("payments", 0, -1)
    return [json.loads(message)["headers"]["id"] for message in raw]


def old_unsent_rows(count: int) -> list[OutboxMessage]:
    rows = OutboxMessage.objects.bulk_create(
        OutboxMessage(task_name=TASK, args=[n]) for n in range(count)
    )
    OutboxMessage.objects.update(created_at=timezone.now() - timedelta(minutes=5))
    return rows


@pytest.fixture
def own_publisher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test's own after-commit publisher, not yet connected; closed after the test.
    (Not thread-local: the publishing thread connects it, the test closes it.)"""
    local = SimpleNamespace()
    monkeypatch.setattr(outbox, "_local", local)
    yield
    if (connection := getattr(local, "connection", None)) is not None:
        connection.release()


@pytest.mark.django_db(transaction=True)
def test_enqueue_publishes_after_commit_with_the_rows_task_id(broker):
    with transaction.atomic():
        message = outbox.enqueue(TASK, args=[7])
        assert published_task_ids(broker) == []

    assert outbox.wait_published()  # by this process's publishing thread, at once
    assert published_task_ids(broker) == [str(message.task_id)]
    # marked sent a moment later (by the process's marking thread; here, now: a thread
    # of the test process may not see pytest-django's test database)
    assert outbox.flush_marks() in (0, 1)  # 0: the thread was first
    assert OutboxMessage.objects.get(pk=message.pk).sent_at is not None
    message.refresh_from_db()
    assert message.attempts == 1


@pytest.mark.django_db(transaction=True)
def test_the_committing_thread_writes_nothing_after_its_commit(broker, settings, monkeypatch):
    settings.JOBS_OUTBOX_MARK_INTERVAL = 2.5  # the marking thread stays out of the way
    publishers: list[int] = []
    real_send = outbox._send

    def send(message: OutboxMessage, *args: object) -> None:
        publishers.append(threading.get_ident())
        real_send(message, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(outbox, "_send", send)
    with CaptureQueriesContext(connection) as queries:
        with transaction.atomic():
            message = outbox.enqueue(TASK, args=[7])
        assert outbox.wait_published()
        assert published_task_ids(broker) == [str(message.task_id)]

    # then: one transaction (the row, with the caller's); the publish is another thread's,
    # and so is the mark after it: a checkout commits once and never waits for the broker
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["BEGIN", "INSERT", "COMMIT"]
    assert publishers
    assert threading.get_ident() not in publishers
    assert outbox.flush_marks() == 1
    assert OutboxMessage.objects.get(pk=message.pk).sent_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_row_published_but_never_marked_is_published_again_with_its_task_id(broker, monkeypatch):
    # given: the process dies between its publish and its mark
    monkeypatch.setattr(outbox._marks, "add", lambda message, using: None)
    message = outbox.enqueue(TASK, args=[7])
    assert outbox.wait_published()
    assert published_task_ids(broker) == [str(message.task_id)]

    # then: the row is still unsent, and the relay publishes it again: the same task id
    # twice, which the idempotent task absorbs like any redelivery (at least once)
    assert outbox.relay_unsent(older_than=0) == 1
    assert published_task_ids(broker) == [str(message.task_id)] * 2
    assert OutboxMessage.objects.get(pk=message.pk).sent_at is not None


@pytest.mark.django_db(transaction=True)
def test_marks_that_fail_are_kept_for_the_next_round(broker, monkeypatch, settings):
    settings.JOBS_OUTBOX_MARK_INTERVAL = 2.5  # the marking thread stays out of the way
    message = outbox.enqueue(TASK, args=[7])
    assert outbox.wait_published()
    real_update = QuerySet.update

    def database_down(self, **fields):
        raise OperationalError("the database went away")

    monkeypatch.setattr(QuerySet, "update", database_down)
    assert outbox._marks.flush() == 0
    monkeypatch.setattr(QuerySet, "update", real_update)

    assert outbox.flush_marks() == 1
    assert OutboxMessage.objects.get(pk=message.pk).sent_at is not None


def test_at_most_max_waiting_rows_wait_in_memory_to_be_marked():
    marks = outbox._Marks()
    marks._pid = os.getpid()  # as if this process's thread ran: none starts, nothing is marked
    rows = [SimpleNamespace(pk=n) for n in range(marks.MAX_WAITING + 1)]

    for row in rows:
        marks.add(row, "default")  # type: ignore[arg-type]

    # then: the row past the bound is not kept (the database gone for long must not grow
    # the process without end); it stays unsent, and the relay publishes it again
    assert marks._waiting == {"default": list(range(marks.MAX_WAITING))}


def test_the_first_process_of_a_container_marks_its_rows_too(monkeypatch):
    started: list[str] = []
    monkeypatch.setattr(outbox.os, "getpid", lambda: 1)  # `exec celery ...` as a container's init
    monkeypatch.setattr(
        outbox.threading,
        "Thread",
        lambda name, **_: SimpleNamespace(start=lambda: started.append(name)),
    )
    marks = outbox._Marks()

    marks.add(SimpleNamespace(pk=7), "default")  # type: ignore[arg-type]

    # then: process 1 starts its marking thread like any other (no "no process yet" value
    # that a real pid can equal)
    assert started == ["outbox-marks"]
    assert marks._waiting == {"default": [7]}


def test_the_marking_thread_outlives_a_round_that_failed(monkeypatch, settings):
    settings.JOBS_OUTBOX_MARK_INTERVAL = 0.01
    rounds: list[int] = []

    class Stop(BaseException):  # ends the thread's loop for the test; not an Exception
        pass

    def a_round() -> None:
        rounds.append(len(rounds) + 1)
        if len(rounds) == 1:
            raise OperationalError("the database went away")
        raise Stop

    marks = outbox._Marks()
    monkeypatch.setattr(marks, "_mark_round", a_round)

    with pytest.raises(Stop):
        marks._mark_forever()

    # then: the failed round was logged and the next one ran (a dead thread would never
    # mark a row again, and every published row would be published twice by the relay)
    assert rounds == [1, 2]


def test_marking_at_exit_that_fails_is_logged_and_the_exit_goes_on(monkeypatch, caplog):
    def database_gone() -> int:
        raise OperationalError("the database went away")

    monkeypatch.setattr(outbox._marks, "flush", database_gone)

    outbox._flush_on_exit()  # as atexit and a pool child's shutdown call it

    assert "marking rows sent on exit failed" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_marking_round_after_the_database_dropped_its_connection_marks_on_a_new_one(
    broker, settings
):
    import psycopg

    settings.JOBS_OUTBOX_MARK_INTERVAL = 0.01
    [row] = old_unsent_rows(1)
    marks = outbox._Marks()
    marks._pid = os.getpid()  # this test runs the rounds, in this thread
    marks.add(row, "default")
    with connection.cursor() as cursor:
        backend = cursor.connection.info.backend_pid
    db = connection.settings_dict
    with psycopg.connect(host=db["HOST"], user=db["USER"], dbname="postgres") as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [backend])  # a restart, a failover
    assert marks.flush() == 0  # this connection is gone; the row waits for the next round

    marks._mark_round()

    # then: the round let the broken connection go, as a request does, and marked the row
    row.refresh_from_db()
    assert row.sent_at is not None


def test_an_idle_marking_thread_waits_a_second_before_it_lets_its_connection_go(monkeypatch):
    closed: list[tuple[int, float]] = []  # by this thread (the process's own may run too)
    monkeypatch.setattr(
        outbox.connections,
        "close_all",
        lambda: closed.append((threading.get_ident(), time.monotonic())),
    )
    marks = outbox._Marks()

    started = time.monotonic()
    marks._mark_round()  # no row is due, in this thread

    # then: it waited for rows, a second, then closed its connection (not a thread that
    # spins, closing and opening connections without a pause)
    [when] = [at for thread, at in closed if thread == threading.get_ident()]
    assert when - started >= 0.9


@pytest.mark.django_db(transaction=True)
def test_broker_down_keeps_the_row_and_the_relay_publishes_it_later(broker):
    with broker.down():
        # when: the broker is down at commit time
        message = outbox.enqueue(TASK, args=[7])  # autocommit: handed over at once
        assert outbox.wait_published()
        message.refresh_from_db()
        # then: the caller saw no error and the row waits, with the reason recorded
        assert message.sent_at is None
        assert message.attempts == 1
        assert "Error" in message.last_error
        assert outbox.relay_unsent(older_than=0) == 0  # still down: nothing relayed

    assert outbox.relay_unsent(older_than=0) == 1

    message.refresh_from_db()
    assert message.sent_at is not None
    assert published_task_ids(broker) == [str(message.task_id)]


@pytest.mark.django_db(transaction=True)
def test_the_relay_stops_its_batch_at_the_first_row_the_broker_does_not_take(broker, monkeypatch):
    rows = old_unsent_rows(5)
    real_send = outbox._send
    sent: list[int] = []
    outage = ExitStack()  # the broker goes down mid-batch; started again after the batch

    def broker_dies_after_two(message: OutboxMessage, connection: object = None) -> None:
        if len(sent) == 2 and broker.proc is not None and broker.proc.poll() is None:
            outage.enter_context(broker.down())
        real_send(message)
        sent.append(message.pk)

    monkeypatch.setattr(outbox, "_send", broker_dies_after_two)
    with outage:
        assert outbox.relay_unsent(older_than=0) == 2
    monkeypatch.undo()

    # then: the third row is the only one tried against the dead broker, once; the rows
    # behind it were not tried at all (they wait for the next run, and count no failure)
    attempts = dict(OutboxMessage.objects.values_list("pk", "attempts"))
    assert [attempts[row.pk] for row in rows] == [1, 1, 1, 0, 0]
    assert OutboxMessage.objects.filter(sent_at__isnull=False).count() == 2
    assert not OutboxMessage.objects.filter(failures__gt=0).exists()
    assert outbox.relay_unsent(older_than=0) == 3


@pytest.mark.django_db(transaction=True)
def test_a_frozen_broker_costs_one_short_timeout_then_the_relay_takes_over(broker, settings):
    settings.JOBS_OUTBOX_PUBLISH_PAUSE = 0.5
    with broker.frozen():
        # when: the broker accepts connections but never answers
        first = outbox.enqueue(TASK, args=[1])  # autocommit: handed over now
        # the request goes on while its row's publish hangs (it cannot have ended: the
        # broker answers nothing), instead of waiting out the timeout itself
        publishing = outbox._outgoing._rows.unfinished_tasks
        second = outbox.enqueue(TASK, args=[2])
        started = time.monotonic()
        assert outbox.wait_published(timeout=60)
        waited = time.monotonic() - started
        paused = outbox.publishing_paused()
    first.refresh_from_db()
    second.refresh_from_db()

    # then: the first publish gave up after the publisher's own timeout (1 s a try), not
    # the workers' 15 s socket timeout that once held a checkout until gunicorn killed
    # it; the second was not even tried: the breaker left it to the relay
    assert publishing == 1
    assert waited < settings.CELERY_BROKER_TRANSPORT_OPTIONS["socket_timeout"]
    assert (first.sent_at, first.attempts, "imeout" in first.last_error) == (None, 1, True)
    assert (second.sent_at, second.attempts, second.last_error) == (None, 0, "")
    assert paused
    assert outbox.relay_unsent(older_than=0) == 2
    # (the publish that timed out may still have reached Redis, which read it once it ran
    # again: then the first task is there twice, under one task id; at least once)
    assert set(published_task_ids(broker)) == {str(first.task_id), str(second.task_id)}

    # and after the pause, publishing after commit is tried again, and works
    wait_until(lambda: not outbox.publishing_paused(), timeout=5)
    third = outbox.enqueue(TASK, args=[3])
    assert outbox.wait_published()
    outbox.flush_marks()
    third.refresh_from_db()
    assert third.sent_at is not None
    assert str(third.task_id) in published_task_ids(broker)


@pytest.mark.django_db(transaction=True)
def test_a_dropped_broker_connection_costs_no_publish(broker):
    outbox.enqueue(TASK, args=[1])  # autocommit: this process's publisher connects
    assert outbox.wait_published()
    # when: the broker drops every client's connection (a restart, a proxy's idle timeout)
    assert broker.client().client_kill_filter(_type="normal", skipme=True) >= 1

    second = outbox.enqueue(TASK, args=[2])
    assert outbox.wait_published()

    # then: the publish went through on a new connection (redis-py's pool sees the closed
    # socket when it hands the connection out, and connects again)
    second.refresh_from_db()
    assert (second.attempts, second.last_error) == (0, "")  # no failure recorded
    assert not outbox.publishing_paused()
    assert str(second.task_id) in published_task_ids(broker)


@pytest.mark.parametrize("connected", [False, True], ids=["new-publisher", "connected"])
@pytest.mark.django_db(transaction=True)
def test_a_broker_that_does_not_answer_gets_one_retry_at_once_then_the_row_waits(
    broker, settings, monkeypatch, own_publisher, connected
):
    settings.JOBS_OUTBOX_PUBLISH_TIMEOUT = 0.3
    if connected:
        outbox.enqueue(TASK, args=[0])  # the publisher connects, as in a running process
        assert outbox.wait_published()
    slept: list[float] = []
    monkeypatch.setattr("kombu.utils.functional.sleep", slept.append)  # kombu's retry wait
    client = broker.client()
    connections_before = client.info("stats")["total_connections_received"]

    with broker.frozen():  # the kernel queues the connections; Redis counts them after
        row = outbox.enqueue(TASK, args=[1])
        assert outbox.wait_published(timeout=60)
    # Redis takes every queued connection in one go (one accept loop, between commands)
    wait_until(
        lambda: client.info("stats")["total_connections_received"] > connections_before,
        timeout=10,
        what="Redis to take the queued connections",
    )

    # then: two attempts to connect (the first, or the one after the publish on the live
    # connection timed out, and its one retry), no wait between them, and the row is
    # left to the relay
    assert client.info("stats")["total_connections_received"] - connections_before == 2
    assert slept == []
    row.refresh_from_db()
    assert (row.sent_at, row.attempts) == (None, 1)


@pytest.mark.django_db(transaction=True)
def test_a_row_refused_after_commit_is_backed_off_and_publishing_goes_on(broker, monkeypatch):
    real_send = outbox._send

    def refuse_the_first(
        message: OutboxMessage, connection: Connection | None = None, lineage: object = None
    ) -> None:
        if message.args == [1]:
            raise EncodeError("this message cannot be serialized")  # the row's, not Redis's
        real_send(message, connection)

    monkeypatch.setattr(outbox, "_send", refuse_the_first)

    # when: a row fails after its commit for a reason of its own
    refused = outbox.enqueue(TASK, args=[1])  # autocommit: handed over now
    assert outbox.wait_published()
    paused = outbox.publishing_paused()
    fine = outbox.enqueue(TASK, args=[2])
    assert outbox.wait_published()

    # then: the breaker stays closed (the broker is fine): the next row is published at
    # once; the refused one counts a failure and backs off, as in the relay
    assert not paused
    assert published_task_ids(broker) == [str(fine.task_id)]
    refused.refresh_from_db()
    assert (refused.sent_at, refused.attempts, refused.failures) == (None, 1, 1)
    assert "cannot be serialized" in refused.last_error
    assert refused.retry_after is not None
    assert refused.retry_after > timezone.now()


@pytest.mark.django_db(transaction=True)
def test_relay_leaves_young_rows_to_their_own_publisher(broker):
    [young] = OutboxMessage.objects.bulk_create([OutboxMessage(task_name=TASK, args=[1])])

    assert outbox.relay_unsent(older_than=60) == 0
    assert outbox.relay_unsent(older_than=0) == 1
    assert published_task_ids(broker) == [str(young.task_id)]


@pytest.mark.django_db(transaction=True)
def test_two_relays_at_once_never_publish_a_row_twice(broker):
    rows = old_unsent_rows(60)
    counts: list[int] = []

    errors = run_concurrently(
        lambda: counts.append(outbox.relay_unsent(older_than=0, batch_size=40))
    )

    assert errors == []
    ids = published_task_ids(broker)
    assert sum(counts) == len(ids)
    assert len(ids) == len(set(ids))  # no row published twice
    assert outbox.relay_all_unsent(older_than=0) == 60 - len(ids)
    assert sorted(published_task_ids(broker)) == sorted(str(r.task_id) for r in rows)
    assert not OutboxMessage.objects.filter(sent_at__isnull=True).exists()


@pytest.mark.django_db(transaction=True)
def test_a_relay_skips_the_row_another_relay_holds_and_publishes_the_rest(broker):
    held, *rest = old_unsent_rows(3)
    holding, release = threading.Event(), threading.Event()

    def another_relay() -> None:  # holds the oldest row's lock, as a relay mid-publish does
        try:
            with transaction.atomic():
                OutboxMessage.objects.select_for_update().get(pk=held.pk)
                holding.set()
                release.wait(timeout=60)
        finally:
            connection.close()

    thread = threading.Thread(target=another_relay)
    thread.start()
    assert holding.wait(timeout=30)
    try:
        with connection.cursor() as cursor:  # a relay that waited for the lock fails, not hangs
            cursor.execute("SET lock_timeout = '10s'")
        sent = outbox.relay_unsent(older_than=0)
    finally:
        release.set()
        thread.join(timeout=60)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")

    # then: it took the rows behind the held one at once, and left that one to its holder
    assert sent == 2
    assert sorted(published_task_ids(broker)) == sorted(str(row.task_id) for row in rest)
    held.refresh_from_db()
    assert held.sent_at is None


@pytest.mark.django_db(transaction=True)
def test_a_relay_run_publishes_at_most_its_batch_the_rest_wait_for_the_next(broker, caplog):
    caplog.set_level(logging.INFO, logger="jobs.outbox")
    rows = old_unsent_rows(5)

    assert outbox.relay_unsent(older_than=0, batch_size=3) == 3

    assert sorted(published_task_ids(broker)) == sorted(str(row.task_id) for row in rows[:3])
    assert OutboxMessage.objects.filter(sent_at__isnull=True).count() == 2
    relay_log = [r.getMessage() for r in caplog.records if r.name == "jobs.outbox"]
    assert relay_log == ["outbox: relayed 3 unsent message(s)"]  # what an operator reads


@pytest.mark.django_db(transaction=True)
def test_relay_all_drains_more_than_one_batch(broker, settings):
    settings.JOBS_OUTBOX_BATCH_SIZE = 7
    old_unsent_rows(20)

    assert outbox.relay_all_unsent(older_than=0) == 20
    assert broker.queue_lengths()["payments"] == 20


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_relay_task_drains_every_batch(broker, settings):
    settings.JOBS_OUTBOX_BATCH_SIZE = 7
    rows = old_unsent_rows(20)
    assert beat_entries(app.conf)["relay-outbox"]["task"] == relay_outbox_task.name

    assert relay_outbox_task.apply().get() == 20

    assert sorted(published_task_ids(broker)) == sorted(str(r.task_id) for r in rows)
    assert not OutboxMessage.objects.filter(sent_at__isnull=True).exists()


@pytest.mark.django_db(transaction=True)
def test_enqueue_to_an_undeclared_queue_fails_loudly_and_rolls_back(broker, monkeypatch):
    typo = Router(
        prepare({"shop.tasks.payments.*": {"queue": "paymnets"}}),
        app.amqp.queues,
        create_missing=False,
        app=app,
    )
    monkeypatch.setattr(app.amqp, "router", typo)

    with pytest.raises(QueueNotFound, match="paymnets"), transaction.atomic():
        outbox.enqueue(TASK, args=[1])

    assert OutboxMessage.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_row_that_cannot_be_routed_does_not_block_the_rows_behind_it(broker, monkeypatch):
    [stuck, *others] = old_unsent_rows(3)
    retire_payments_route(monkeypatch, stuck)

    assert outbox.relay_unsent(older_than=0) == 2

    stuck.refresh_from_db()
    assert stuck.sent_at is None
    assert "retired" in stuck.last_error
    assert sorted(published_task_ids(broker)) == sorted(str(r.task_id) for r in others)


def retire_payments_route(monkeypatch, stuck: OutboxMessage) -> None:
    """Route `stuck` to a queue that is not declared (it was removed in a deploy)."""
    OutboxMessage.objects.filter(pk=stuck.pk).update(task_name="shop.tasks.retired.old_task")
    routes = {"shop.tasks.retired.*": {"queue": "retired"}, "shop.tasks.payments.*": "payments"}
    monkeypatch.setattr(
        app.amqp, "router", Router(prepare(routes), app.amqp.queues, create_missing=False, app=app)
    )


@pytest.mark.django_db(transaction=True)
def test_a_relay_killed_mid_batch_keeps_the_rows_it_published_marked(broker, monkeypatch):
    rows = old_unsent_rows(10)
    real_send = outbox._send
    calls: list[int] = []

    def send_then_die_on_the_fourth(message: OutboxMessage, connection: object = None) -> None:
        calls.append(message.pk)
        real_send(message)
        if len(calls) == 4:  # published, then the hard time limit kills the process
            raise SystemExit("killed by the hard time limit")

    monkeypatch.setattr(outbox, "_send", send_then_die_on_the_fourth)
    with pytest.raises(SystemExit):
        outbox.relay_unsent(older_than=0)
    monkeypatch.undo()
    outbox.relay_all_unsent(older_than=0)  # the next run

    published = Counter(published_task_ids(broker))
    assert set(published) == {str(r.task_id) for r in rows}
    # Only the row being published at the kill goes out twice; the three before it stay sent.
    assert sorted(published.values()) == [1] * 9 + [2]
    assert published[str(rows[3].task_id)] == 2


@pytest.mark.django_db(transaction=True)
def test_the_relay_stops_at_its_time_limit_and_commits_what_it_sent(broker, monkeypatch):
    rows = old_unsent_rows(5)
    real_send = outbox._send
    tried: list[int] = []

    def slow_broker(message: OutboxMessage, connection: object = None) -> None:
        tried.append(message.pk)
        if message.pk == rows[2].pk:
            raise SoftTimeLimitExceeded()  # the task's soft limit, mid-publish
        real_send(message)

    monkeypatch.setattr(outbox, "_send", slow_broker)

    assert outbox.relay_unsent(older_than=0) == 2  # stopped, not "one bad message"

    assert tried == [row.pk for row in rows[:3]]  # nothing tried after the limit
    assert OutboxMessage.objects.filter(sent_at__isnull=False).count() == 2
    assert OutboxMessage.objects.get(pk=rows[2].pk).failures == 0


@pytest.mark.django_db(transaction=True)
def test_a_row_that_keeps_failing_backs_off_then_becomes_a_dead_letter(
    broker, monkeypatch, settings
):
    settings.JOBS_OUTBOX_MAX_FAILURES = 3
    [stuck, *others] = old_unsent_rows(3)
    retire_payments_route(monkeypatch, stuck)

    # the first failure backs the row off: the next run does not try it
    assert outbox.relay_unsent(older_than=0) == 2
    stuck.refresh_from_db()
    assert stuck.failures == 1
    assert stuck.retry_after is not None
    assert stuck.retry_after > timezone.now()
    assert outbox.relay_unsent(older_than=0) == 0
    assert OutboxMessage.objects.get(pk=stuck.pk).failures == 1
    # when its back-off is over, each run tries it again, up to the bound
    for _ in range(2):
        OutboxMessage.objects.filter(pk=stuck.pk).update(retry_after=timezone.now())
        outbox.relay_unsent(older_than=0)

    stuck.refresh_from_db()
    letter = DeadLetter.objects.get(task_id=str(stuck.task_id))
    assert (letter.reason, letter.task_name, letter.args) == (
        "unpublishable",
        "shop.tasks.retired.old_task",
        stuck.args,
    )
    assert "retired" in letter.exception_message
    assert (stuck.failures, stuck.sent_at, stuck.dead_lettered_at is not None) == (3, None, True)
    OutboxMessage.objects.filter(pk=stuck.pk).update(retry_after=None)
    assert outbox.relay_unsent(older_than=0) == 0  # never tried again: the DLQ holds it
    assert sorted(published_task_ids(broker)) == sorted(str(r.task_id) for r in others)


@pytest.mark.django_db(transaction=True)
def test_a_failing_row_waits_the_grace_period_doubled_per_failure_up_to_ten_minutes(
    broker, monkeypatch, settings
):
    settings.JOBS_OUTBOX_MAX_FAILURES = 20
    settings.JOBS_OUTBOX_RELAY_GRACE = 10
    [stuck] = old_unsent_rows(1)
    retire_payments_route(monkeypatch, stuck)

    waits = []
    for _ in range(8):
        OutboxMessage.objects.filter(pk=stuck.pk).update(retry_after=timezone.now())  # due
        before = timezone.now()
        outbox.relay_unsent(older_than=0)
        after = timezone.now()
        stuck.refresh_from_db()
        assert stuck.retry_after is not None
        wait = (stuck.retry_after - before).total_seconds()
        assert wait - (after - before).total_seconds() <= round(wait) <= wait
        waits.append(round(wait))

    assert waits == [10, 20, 40, 80, 160, 320, 600, 600]


@pytest.mark.parametrize(
    ("error", "path"),
    [(ConnectionError, "the broker down"), (ValueError, "this row's own failure")],
    ids=["broker-down", "backed-off"],
)
@pytest.mark.django_db(transaction=True)
def test_a_failures_message_is_kept_cut_to_2000_characters(broker, monkeypatch, error, path):
    def send(message: OutboxMessage, connection: object = None) -> None:
        raise error("x" * 5000)

    monkeypatch.setattr(outbox, "_send", send)
    [row] = old_unsent_rows(1)

    outbox.relay_unsent(older_than=0)

    row.refresh_from_db()
    assert row.last_error == repr(error("x" * 5000))[:2000]
    assert len(row.last_error) == 2000


@pytest.mark.django_db(transaction=True)
def test_an_after_commit_publisher_that_fails_never_fails_the_request_that_committed(
    broker, monkeypatch, caplog
):
    real_publish = outbox._publish_committed

    def broken_once(message: OutboxMessage, using: str | None, lineage: object = None) -> None:
        if message.args == [1]:
            raise RuntimeError("a bug in the publisher")
        real_publish(message, using)

    monkeypatch.setattr(outbox, "_publish_committed", broken_once)

    with transaction.atomic():  # the request's transaction: it commits, nothing raises
        row = outbox.enqueue(TASK, args=[1])
    later = outbox.enqueue(TASK, args=[2])
    assert outbox.wait_published()

    assert "a bug in the publisher" in caplog.text  # the publishing thread logged it...
    assert published_task_ids(broker) == [str(later.task_id)]  # ...and lived on
    outbox.flush_marks()
    assert OutboxMessage.objects.get(pk=row.pk).sent_at is None  # the relay's to send
    assert outbox.relay_unsent(older_than=0) == 1


def test_at_most_limit_rows_wait_in_memory_to_be_published(caplog):
    outgoing = outbox._Outgoing()
    outgoing._pid = os.getpid()  # as if this process's thread ran: none starts
    rows = [SimpleNamespace(pk=n) for n in range(outgoing.LIMIT + 2)]

    for row in rows:
        outgoing.add(row, "default")  # type: ignore[arg-type]

    # then: the rows past the bound are not kept (a publish stuck on a frozen broker must
    # not grow the process without end); they stay unsent for the relay, said once
    assert outgoing._rows.qsize() == outgoing.LIMIT
    assert caplog.text.count("the relay sends the next") == 1


@pytest.mark.django_db(transaction=True)
def test_a_row_that_waited_half_the_grace_period_is_left_to_the_relay(broker, monkeypatch, caplog):
    real_publish = outbox._publish_committed
    held = threading.Event()

    def held_back(message: OutboxMessage, using: str | None, lineage: object = None) -> None:
        held.wait(timeout=10)  # a broker that answers, slowly
        real_publish(message, using)

    monkeypatch.setattr(outbox, "_publish_committed", held_back)
    slow = outbox.enqueue(TASK, args=[1])
    late = outbox.enqueue(TASK, args=[2])  # waits behind the slow one
    late.created_at = timezone.now() - timedelta(seconds=6)  # (its copy in memory) grace 10 s
    held.set()
    assert outbox.wait_published()

    # then: the row that waited in memory longer than half the grace was not published
    # (the relay may have taken it by then: it would go out twice); the relay sends it
    assert published_task_ids(broker) == [str(slow.task_id)]
    assert "left to the relay" in caplog.text
    outbox.flush_marks()
    assert outbox.relay_unsent(older_than=0) == 1
    assert sorted(published_task_ids(broker)) == sorted([str(slow.task_id), str(late.task_id)])


@pytest.mark.django_db(transaction=True)
def test_a_job_enqueued_by_a_task_is_published_as_its_child(broker):
    from celery._state import _task_stack

    parent = app.tasks["jobs.tasks.relay_outbox"]
    parent.push_request(id="charge-1", root_id="checkout-0", called_directly=False)
    _task_stack.push(parent)
    try:
        with transaction.atomic():
            outbox.enqueue(TASK, args=[1])
    finally:
        _task_stack.pop()
        parent.pop_request()
    assert outbox.wait_published()

    # then: the message names the task that enqueued it and its root, as a publish in the
    # task's own thread would (Flower shows the tree), though another thread published it
    [raw] = broker.client().lrange("payments", 0, -1)
    headers = json.loads(raw)["headers"]
    assert (headers["parent_id"], headers["root_id"]) == ("charge-1", "checkout-0")


@pytest.mark.django_db(transaction=True)
def test_a_process_that_exits_publishes_and_marks_the_rows_it_committed(broker, monkeypatch):
    real_publish = outbox._publish_committed

    def slow(message: OutboxMessage, using: str | None, lineage: object = None) -> None:
        time.sleep(0.3)  # still publishing when the process starts to exit
        real_publish(message, using)

    monkeypatch.setattr(outbox, "_publish_committed", slow)
    row = outbox.enqueue(TASK, args=[1])

    outbox._flush_on_exit()  # as atexit and a pool child's shutdown call it

    # then: the exit waited for the publish, then marked the row (not a row the relay
    # would publish a second time)
    assert published_task_ids(broker) == [str(row.task_id)]
    row.refresh_from_db()
    assert row.sent_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_broker_outage_does_not_count_towards_dead_lettering_a_row(broker, settings):
    settings.JOBS_OUTBOX_MAX_FAILURES = 2
    [row] = old_unsent_rows(1)
    with broker.down():
        for _ in range(5):
            assert outbox.relay_unsent(older_than=0) == 0

    row.refresh_from_db()
    assert (row.attempts, row.failures, row.dead_lettered_at) == (5, 0, None)
    assert not DeadLetter.objects.exists()
    assert outbox.relay_unsent(older_than=0) == 1


@pytest.mark.django_db
def test_enqueue_rejects_arguments_that_are_not_json():
    with pytest.raises(TypeError), transaction.atomic():
        outbox.enqueue(TASK, args=[object()])

    assert OutboxMessage.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("retention", ["argument", "setting"])
def test_prune_deletes_sent_and_dead_lettered_rows_past_retention(settings, retention):
    sent, recent, dead, unsent = OutboxMessage.objects.bulk_create(
        OutboxMessage(task_name=TASK) for _ in range(4)
    )
    now = timezone.now()
    OutboxMessage.objects.filter(pk=sent.pk).update(sent_at=now - timedelta(days=3))
    OutboxMessage.objects.filter(pk=recent.pk).update(sent_at=now - timedelta(days=1))
    OutboxMessage.objects.filter(pk=dead.pk).update(dead_lettered_at=now - timedelta(days=3))
    OutboxMessage.objects.filter(pk=unsent.pk).update(created_at=now - timedelta(days=30))

    # when: pruned with two days' retention (not the default seven), in chunks of one row,
    # or by the scheduled task with the retention set
    if retention == "argument":
        deleted = outbox.prune_sent(older_than_days=2, chunk=1)
    else:
        settings.JOBS_OUTBOX_RETENTION_DAYS = 2
        assert beat_entries(app.conf)["prune-outbox"]["task"] == prune_outbox_task.name
        deleted = prune_outbox_task.apply().get()

    # then: the rows done with (sent, or handed to the dead letters) past it are gone; an
    # unsent row stays whatever its age (the relay still owes it a publish)
    assert deleted == 2
    assert set(OutboxMessage.objects.values_list("pk", flat=True)) == {recent.pk, unsent.pk}


@pytest.mark.django_db(transaction=True)
def test_outbox_relay_command(broker, capsys):
    old_unsent_rows(3)

    call_command("outbox_relay", grace=0)

    assert capsys.readouterr().out.strip() == "relayed 3 message(s)"
    assert broker.queue_lengths()["payments"] == 3
    with pytest.raises(CommandError, match="positive"):
        call_command("outbox_relay", loop=0)


def test_the_check_passes_the_shipped_marking_interval():
    assert outbox_check() == []


@pytest.mark.parametrize("interval", [0, 2.6], ids=["never", "near-the-grace"])
def test_the_check_refuses_a_marking_interval_the_relay_would_overtake(settings, interval):
    settings.JOBS_OUTBOX_RELAY_GRACE = 10
    settings.JOBS_OUTBOX_MARK_INTERVAL = interval

    assert [error.id for error in outbox_check()] == ["jobs.E004"]
