"""The transactional outbox: a task is published only if, and soon after, its data commits.

`enqueue()` writes an OutboxMessage row in the caller's transaction; right after COMMIT
the row is handed to this process's publishing thread (`_Outgoing`), which publishes it
at once. A rollback discards both. If the broker is down, or the process dies between
COMMIT and publish, the row stays unsent and `relay_unsent()` (run by beat every few
seconds, or `manage.py outbox_relay`) publishes it later. The request never waits on the
broker: a broker that does not answer costs the publishing thread a few short timeouts,
then the process leaves its rows to the relay for a while (a circuit breaker).
A published row is marked sent with other rows in one UPDATE a moment later (`_Marks`),
so a checkout commits once.
Delivery is therefore at least once: consumers must be idempotent, and they are.
"""

import atexit
import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from queue import Full, Queue
from typing import Any, cast

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from django.db import DatabaseError, connections, router, transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu import Connection
from kombu.exceptions import OperationalError

from jobs import correlation, metrics
from jobs.celery import app, queue_of
from jobs.conf import jobs_settings
from jobs.logs import job_event
from jobs.models import OutboxMessage
from jobs.retry import ceiling

# Errors that mean "the broker is unreachable": stop the batch, the rest would fail too.
# Anything else is about one message (a task routed to a queue that no longer exists):
# record it on the row and go on, so one bad row never blocks the rows behind it.
BROKER_DOWN = (OperationalError, ConnectionError, TimeoutError, OSError)

logger = logging.getLogger(__name__)

Lineage = tuple[str, str] | None  # (root id, parent id) of the task that enqueued, if any
_Handed = tuple[OutboxMessage, str | None, Lineage]

# One retry, at once: a connection that cannot be made is tried once more, and a publish
# whose connection stopped answering once more on a new one; then the row is left to the
# relay. A frozen broker costs the publishing thread three timeouts at most (the publish,
# then two attempts to connect), once (see below).
_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}

# The after-commit publish gets a short leash. A publish to a healthy Redis takes under
# a millisecond; one that has not answered in JOBS_OUTBOX_PUBLISH_TIMEOUT is talking to
# a frozen or partitioned broker. (When the publish still ran in the request, with the
# workers' socket timeout of 15 s and the retry, a checkout against a SIGSTOPped Redis
# hung for 30 s until gunicorn killed it: the shopper got a 500 for an order that was
# placed; make bench, scenario 7.) Once a publish failed, this process leaves the next
# rows to the relay for JOBS_OUTBOX_PUBLISH_PAUSE seconds (a circuit breaker), instead
# of waiting out the timeout for every row again while its rows pile up.
_local = threading.local()
_paused_until = 0.0  # time.monotonic() before which after-commit publishes are skipped


def _publisher() -> Connection:
    """This thread's broker connection for after-commit publishes (short timeouts)."""
    if getattr(_local, "pid", None) != os.getpid():  # a forked child opens its own
        timeout = jobs_settings.OUTBOX_PUBLISH_TIMEOUT
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        # redis-py would retry a timeout three times, backing off up to 10 s between.
        options["retry_on_timeout"] = False
        _local.connection = app.connection_for_write(transport_options=options)
        _local.pid = os.getpid()
    return cast(Connection, _local.connection)


def publishing_paused() -> bool:
    """True while the breaker is open: after-commit publishes are left to the relay."""
    return time.monotonic() < _paused_until


def resume_publishing() -> None:
    global _paused_until
    _paused_until = 0.0


def enqueue(
    task: Task | str,
    *,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
    using: str | None = None,
) -> OutboxMessage:
    """Record `task(*args, **kwargs)` in the current transaction; publish it after commit.

    Raises at once (inside the caller's transaction, which then rolls back) when the task
    routes to a queue that is not declared: a misrouted task must fail loudly.
    """
    name = task if isinstance(task, str) else task.name
    args, kwargs = list(args), dict(kwargs or {})
    queue = queue_of(name)  # raises QueueNotFound: a misrouted task fails loudly, here
    headers = dict(headers or {})
    if correlation.get():
        headers.setdefault(correlation.HEADER, correlation.get())
    message = OutboxMessage.objects.using(using).create(
        task_name=name, args=args, kwargs=kwargs, headers=headers
    )

    # A function, not a functools.partial: Django logs a robust callback that failed by
    # its __qualname__, which a partial lacks (the logging itself would raise).
    def publish() -> None:
        metrics.ENQUEUED.labels(name, queue).inc()
        _outgoing.add(message, using, _lineage())

    transaction.on_commit(publish, using=using, robust=True)
    job_event("enqueued", task_id=str(message.task_id), task_name=name, queue=queue)
    return message


def _lineage() -> Lineage:
    """(root id, parent id) when a task enqueues: Celery reads them from the task running
    in the publishing thread, which has none (Flower shows a receipt under its charge)."""
    parent = app.current_worker_task
    if parent is None or not parent.request.id:
        return None
    return (parent.request.root_id or parent.request.id, parent.request.id)


def _sent(message: OutboxMessage) -> None:
    metrics.PUBLISHED.labels(message.task_name, queue_of(message.task_name)).inc()
    job_event("published", task_id=str(message.task_id), task_name=message.task_name)


def _send(
    message: OutboxMessage,
    connection: Connection | None = None,
    lineage: Lineage = None,
) -> None:
    root_id, parent_id = lineage or (None, None)
    app.send_task(
        message.task_name,
        args=message.args,
        kwargs=message.kwargs,
        task_id=str(message.task_id),
        headers=message.headers or None,
        connection=connection,
        retry=True,
        retry_policy=_PUBLISH_RETRY_POLICY,
        root_id=root_id,
        parent_id=parent_id,
    )


def _record_failure(message: OutboxMessage, exc: Exception, using: str | None) -> None:
    """The broker did not take the row: it waits for the next relay run as it is."""
    logger.warning(
        "outbox: publishing %s (%s) failed, the relay will retry: %r",
        message.task_name,
        message.task_id,
        exc,
    )
    OutboxMessage.objects.using(using).filter(pk=message.pk).update(
        attempts=F("attempts") + 1, last_error=repr(exc)[:2000]
    )


def _back_off(message: OutboxMessage, exc: Exception, using: str | None) -> None:
    """The row failed for a reason of its own: try it later, or give it to a person.

    A row routed to a queue that no longer exists fails on every run; without a back-off
    it would be first in every batch forever. After JOBS_OUTBOX_MAX_FAILURES it becomes a
    dead letter (reason `unpublishable`), replayable once the cause is fixed.
    """
    from jobs.dead_letters import dead_letter_unpublishable  # it imports this module

    failures = message.failures + 1
    now = timezone.now()
    fields: dict[str, Any] = {
        "attempts": F("attempts") + 1,
        "failures": failures,
        "last_error": repr(exc)[:2000],
    }
    if failures >= jobs_settings.OUTBOX_MAX_FAILURES:
        dead_letter_unpublishable(message=message, error=repr(exc))
        fields["dead_lettered_at"] = now
        logger.error(
            "outbox: %s (%s) failed %d times: dead-lettered",
            message.task_name,
            message.task_id,
            failures,
        )
    else:
        wait = ceiling(failures - 1, base=jobs_settings.OUTBOX_RELAY_GRACE, cap=600.0)
        fields["retry_after"] = now + timedelta(seconds=wait)
        logger.warning(
            "outbox: publishing %s (%s) failed (%d), next try in %g s: %r",
            message.task_name,
            message.task_id,
            failures,
            wait,
            exc,
        )
    OutboxMessage.objects.using(using).filter(pk=message.pk).update(**fields)


class _Marks:
    """Rows this process published after their commit, waiting to be marked sent.

    Marking each row with its own UPDATE was a second COMMIT on every checkout's path,
    after the publish and before the response (make bench, scenario 9). Instead the id
    waits here, and a thread of this process marks every waiting row in one UPDATE,
    JOBS_OUTBOX_MARK_INTERVAL seconds after the first of them came. A process that dies
    first (killed, the database unreachable) leaves those rows unsent: the relay publishes
    them again once they are older than the grace period, under the same task id, as
    any redelivery (at least once). So the grace period must be far longer than the
    interval; a start-up check (jobs.E004) refuses one that is not.
    """

    MAX_WAITING = 100_000  # beyond this (the database gone for long) the relay re-sends
    IDLE = 1.0  # seconds without a row to mark after which the thread's connection closes

    def __init__(self) -> None:
        self._reset()
        # A child forked while the parent's thread held the lock would wait for ever.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[int]] = {}  # database alias -> row ids
        self._due = threading.Event()
        self._pid = 0  # the process whose thread marks: a forked child starts its own

    def add(self, message: OutboxMessage, using: str | None) -> None:
        alias = using or router.db_for_write(OutboxMessage)
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._waiting = os.getpid(), {}
                # RuntimeError: the interpreter is exiting; the exit's flush marks the rows.
                with contextlib.suppress(RuntimeError):
                    threading.Thread(
                        target=self._mark_forever, name="outbox-marks", daemon=True
                    ).start()
            if sum(map(len, self._waiting.values())) < self.MAX_WAITING:
                self._waiting.setdefault(alias, []).append(message.pk)
        self._due.set()

    def flush(self) -> int:
        """Mark every waiting row sent now; how many were marked."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        marked = 0
        for alias, ids in waiting.items():
            try:
                marked += (
                    OutboxMessage.objects.using(alias)
                    .filter(pk__in=ids, sent_at__isnull=True)
                    .update(sent_at=timezone.now(), attempts=F("attempts") + 1)
                )
            except DatabaseError as exc:
                logger.warning("outbox: marking %d row(s) sent failed: %r", len(ids), exc)
                with self._lock:  # the next round tries again; the relay if it never can
                    self._waiting.setdefault(alias, []).extend(ids)
        return marked

    def discard(self) -> None:
        """Forget the waiting rows unmarked (a test whose database is rolled back: the ids
        name nothing any more, and at exit the database may be gone)."""
        with self._lock:
            self._waiting = {}

    def _mark_forever(self) -> None:
        while True:
            try:
                self._mark_round()
            except Exception as exc:  # never die: a dead thread would mark nothing again
                logger.warning("outbox: marking rows sent failed, trying again: %r", exc)
                time.sleep(jobs_settings.OUTBOX_MARK_INTERVAL)

    def _mark_round(self) -> None:
        if not self._due.wait(timeout=self.IDLE):
            connections.close_all()  # this thread's: nothing to mark for a while
            return
        time.sleep(jobs_settings.OUTBOX_MARK_INTERVAL)  # gather the rows coming in
        self._due.clear()
        for alias in connections:  # as a request does: CONN_MAX_AGE, health checks
            connections[alias].close_if_unusable_or_obsolete()
        self.flush()


_marks = _Marks()


def _flush_on_exit(**_: Any) -> None:
    try:
        # A frozen broker holds the publishing thread for three timeouts at most.
        _outgoing.wait(3 * jobs_settings.OUTBOX_PUBLISH_TIMEOUT)
        _marks.flush()
    except Exception as exc:  # exiting anyway: the relay sends these rows again
        logger.warning("outbox: marking rows sent on exit failed: %r", exc)


atexit.register(_flush_on_exit)  # a clean exit (gunicorn, a threads worker) publishes, marks
worker_process_shutdown.connect(_flush_on_exit, weak=False)  # prefork pool children


def flush_marks() -> int:
    """Mark the rows this process published sent, now instead of a moment later (tests,
    a process about to exit); how many were marked."""
    return _marks.flush()


class _Outgoing:
    """Rows this process committed, waiting for its publishing thread.

    The publish after COMMIT ran in the request: against a frozen broker the first
    checkout of every web process waited out its timeouts (about 3 s; make bench,
    scenario 7), and against a healthy one every checkout still waited for the publish
    (a Redis client built per publish, and Flower's task-sent event). Now the request
    hands its rows over and answers, and one thread per process publishes them, one
    after the other. A process that dies first loses nothing: the rows it had not
    published are unsent in the database, and the relay publishes them once they are
    older than the grace period, as after a crash between COMMIT and the publish.

    A row that waited here longer than half the grace period (a broker slow to answer
    but within the timeout, so the breaker stays closed) is left to the relay: published
    here too, it would go out twice, or after an operator's decision about it. So a row
    is published before half the grace period and marked sent a mark interval later
    (at most a quarter of the grace: jobs.E004), before the relay would take it.
    """

    LIMIT = 10_000  # rows waiting in memory; beyond (a stuck publish) the relay sends them

    def __init__(self) -> None:
        self._reset()
        # A child forked while the parent's thread held the lock would wait for ever.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._rows: Queue[_Handed] = Queue(self.LIMIT)
        self._pid = 0  # the process whose thread publishes: a forked child starts its own
        self._overflowing = False
        self._late_said = 0.0  # time.monotonic() of the last "left to the relay" warning

    def add(self, message: OutboxMessage, using: str | None, lineage: Lineage = None) -> None:
        with self._lock:
            if self._pid != os.getpid():
                try:
                    threading.Thread(
                        target=self._publish_forever, name="outbox-publish", daemon=True
                    ).start()
                except RuntimeError:  # the interpreter is exiting: publish here, now
                    _publish_committed(message, using, lineage)
                    return
                self._pid = os.getpid()
        try:
            self._rows.put_nowait((message, using, lineage))
        except Full:
            if not self._overflowing:
                logger.warning(
                    "outbox: %d rows wait to be published: the relay sends the next", self.LIMIT
                )
            self._overflowing = True
            return
        self._overflowing = False

    def wait(self, timeout: float) -> bool:
        """Wait until every row handed over was tried; False if some still wait."""
        deadline = time.monotonic() + timeout
        with self._rows.all_tasks_done:
            while self._rows.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._rows.all_tasks_done.wait(left)
        return True

    def _publish_forever(self) -> None:
        while True:
            message, using, lineage = self._rows.get()
            try:
                self._publish(message, using, lineage)
            except Exception:  # never die: a dead thread would publish nothing again
                logger.exception(
                    "outbox: publishing %s after its commit failed; the relay will send it",
                    message.task_id,
                )
            finally:
                self._rows.task_done()
                if self._rows.empty():
                    connections.close_all()  # this thread's, if it recorded a failure

    def _publish(self, message: OutboxMessage, using: str | None, lineage: Lineage) -> None:
        waited = (timezone.now() - message.created_at).total_seconds()
        if waited > jobs_settings.OUTBOX_RELAY_GRACE / 2:
            if time.monotonic() - self._late_said > 10:
                self._late_said = time.monotonic()
                logger.warning(
                    "outbox: rows waited %.1f s to be published: left to the relay", waited
                )
            return
        for alias in connections:  # as a request does: CONN_MAX_AGE, health checks
            connections[alias].close_if_unusable_or_obsolete()
        # The request's correlation id, for the log lines of its row's publish.
        token = correlation.activate((message.headers or {}).get(correlation.HEADER, ""))
        try:
            _publish_committed(message, using, lineage)
        finally:
            correlation.deactivate(token)


_outgoing = _Outgoing()


def wait_published(timeout: float = 10.0) -> bool:
    """Wait until this process's publishing thread has tried every row committed so far
    (tests; a process about to exit); False if some still wait after `timeout` s."""
    return _outgoing.wait(timeout)


def _publish_committed(message: OutboxMessage, using: str | None, lineage: Lineage = None) -> None:
    """Publish one committed row (the publishing thread). Never raises for the broker:
    a row it does not take waits for the relay."""
    global _paused_until
    if publishing_paused():
        return  # the broker failed us moments ago: the relay sends this row
    try:
        _send(message, _publisher(), lineage)
    except BROKER_DOWN as exc:
        pause = jobs_settings.OUTBOX_PUBLISH_PAUSE
        _paused_until = time.monotonic() + pause  # first: recording it may fail too
        logger.warning("outbox: publishing after commit paused for %g s", pause)
        _record_failure(message, exc, using)
        return
    except Exception as exc:
        _back_off(message, exc, using)
        return
    _marks.add(message, using)
    _sent(message)


class _Relayed(enum.Enum):
    SENT = "sent"
    FAILED = "failed"  # this row failed; the others may not
    BROKER_DOWN = "broker_down"  # stop: the rest would fail too
    NOTHING = "nothing"  # no row is due


def _relay_one(cutoff: datetime, using: str | None) -> _Relayed:
    """Lock the oldest due row, publish it, mark it sent: one transaction."""
    now = timezone.now()
    with transaction.atomic(using=using):
        message = (
            OutboxMessage.objects.using(using)
            .select_for_update(skip_locked=True)
            .filter(sent_at__isnull=True, dead_lettered_at__isnull=True, created_at__lte=cutoff)
            .filter(Q(retry_after__isnull=True) | Q(retry_after__lte=now))
            .order_by("id")
            .first()
        )
        if message is None:
            return _Relayed.NOTHING
        try:
            _send(message)
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: this row rolls back, the ones before it stay sent
        except BROKER_DOWN as exc:
            _record_failure(message, exc, using)
            return _Relayed.BROKER_DOWN
        except Exception as exc:
            _back_off(message, exc, using)
            return _Relayed.FAILED
        OutboxMessage.objects.using(using).filter(pk=message.pk).update(
            sent_at=timezone.now(), attempts=F("attempts") + 1
        )
    _sent(message)
    return _Relayed.SENT


def relay_unsent(
    *,
    older_than: float | None = None,
    batch_size: int | None = None,
    using: str | None = None,
    stop_at: float | None = None,
) -> int:
    """Publish up to `batch_size` due unsent rows older than `older_than` seconds, oldest
    first; return how many were published.

    Each row is locked (SELECT ... FOR UPDATE SKIP LOCKED, so two relays at once take
    different rows), published and marked sent in a transaction of its own: a relay cut
    off mid-batch (a slow broker, its time limit) loses the mark of the one row it was
    publishing at most, so that row alone is published again; the rows before it stay
    sent. The relay also stops by itself after JOBS_OUTBOX_RELAY_TIME_BUDGET seconds (or
    at `stop_at`, a time.monotonic() value), well inside its task's time limit. A
    row younger than the grace period is left to the publisher of its own transaction.
    When the broker is unreachable the relay stops: the rest wait for the next run.
    """
    grace = jobs_settings.OUTBOX_RELAY_GRACE if older_than is None else older_than
    limit = jobs_settings.OUTBOX_BATCH_SIZE if batch_size is None else batch_size
    cutoff = timezone.now() - timedelta(seconds=grace)
    if stop_at is None:
        stop_at = time.monotonic() + jobs_settings.OUTBOX_RELAY_TIME_BUDGET
    sent = tried = 0
    while tried < limit and time.monotonic() < stop_at:
        try:
            outcome = _relay_one(cutoff, using)
        except SoftTimeLimitExceeded:
            logger.warning("outbox: relay cut off by its time limit after %d row(s)", sent)
            break
        if outcome in (_Relayed.NOTHING, _Relayed.BROKER_DOWN):
            break
        tried += 1
        sent += outcome is _Relayed.SENT
    if sent:
        logger.info("outbox: relayed %d unsent message(s)", sent)
    return sent


def relay_all_unsent(*, older_than: float | None = None, using: str | None = None) -> int:
    """Relay batches until a batch comes back short (no rows left, the broker down, or
    JOBS_OUTBOX_RELAY_TIME_BUDGET spent: the next run goes on)."""
    total = 0
    limit = jobs_settings.OUTBOX_BATCH_SIZE
    stop_at = time.monotonic() + jobs_settings.OUTBOX_RELAY_TIME_BUDGET
    while True:
        count = relay_unsent(older_than=older_than, batch_size=limit, using=using, stop_at=stop_at)
        total += count
        if count < limit:
            return total


def prune_sent(*, older_than_days: int | None = None, chunk: int = 5000) -> int:
    """Delete sent rows past retention, in chunks so no transaction grows unbounded."""
    days = jobs_settings.OUTBOX_RETENTION_DAYS if older_than_days is None else older_than_days
    cutoff = timezone.now() - timedelta(days=days)
    deleted = 0
    while True:
        done = Q(sent_at__lt=cutoff) | Q(dead_lettered_at__lt=cutoff)  # the DLQ holds the job
        ids = list(OutboxMessage.objects.filter(done).values_list("pk", flat=True)[:chunk])
        if not ids:
            return deleted
        deleted += OutboxMessage.objects.filter(pk__in=ids).delete()[0]
