"""Dead letters: written from the one place that sees every terminal failure, replayed
or discarded by an operator, pruned after retention.

The writer is a `task_failure` receiver. It fires in the pool child for an exception
raised by the task body, and in the worker's main process when the child was lost
(WorkerLostError) or killed by the hard time limit; `Task.on_failure` misses the first
of those. A failure is signalled again when a message is redelivered, so the write is
idempotent: one row per original task id.
"""

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.exceptions import QueueNotFound
from celery.signals import task_failure, task_success
from django.db import close_old_connections, transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.module_loading import autodiscover_modules

from jobs import correlation, metrics, outbox
from jobs.celery import app
from jobs.conf import jobs_settings
from jobs.dependencies import operator_call
from jobs.errors import PermanentError, PoisonMessage, TransientError
from jobs.lifecycle import describe, request_header
from jobs.logs import job_event
from jobs.models import DeadLetter, OutboxMessage

logger = logging.getLogger(__name__)

REPLAY_HEADER = "replay_of"
CORRELATION_HEADER = correlation.HEADER


def failure_reason(task: Task, exception: BaseException, retries: int) -> str:
    if isinstance(exception, WorkerLostError):
        return DeadLetter.Reason.WORKER_LOST
    if isinstance(exception, TimeLimitExceeded | SoftTimeLimitExceeded):
        return DeadLetter.Reason.TIME_LIMIT
    if isinstance(exception, PoisonMessage):
        return DeadLetter.Reason.POISON
    if isinstance(exception, PermanentError):
        return DeadLetter.Reason.PERMANENT_ERROR
    return DeadLetter.Reason.RETRIES_EXHAUSTED


def dead_letter_record(
    *,
    task: Task,
    task_id: str,
    exception: BaseException,
    args: Iterable[Any] | None,
    kwargs: dict[str, Any] | None,
    traceback: str,
    reason: str | None = None,
) -> DeadLetter:
    """Write (or touch) the dead letter of `task_id`. Safe to call any number of times."""
    request = task.request
    retries = int(request.retries or 0)
    now = timezone.now()
    letter, created = DeadLetter.objects.get_or_create(
        task_id=task_id,
        defaults={
            "task_name": task.name,
            "args": list(args or []),
            "kwargs": dict(kwargs or {}),
            "queue": describe(task)["queue"],
            "reason": reason or failure_reason(task, exception, retries),
            "exception_class": f"{type(exception).__module__}.{type(exception).__qualname__}",
            "exception_message": str(exception)[:5000],
            "traceback": traceback[:50_000],
            "attempts": retries + 1,
            "correlation_id": request_header(request, CORRELATION_HEADER) or correlation.get(),
            "replay_of": request_header(request, REPLAY_HEADER),
        },
    )
    if created:
        metrics.DEAD_LETTERED.labels(task.name, letter.queue, letter.reason).inc()
    else:
        DeadLetter.objects.filter(pk=letter.pk).update(last_failed_at=now)
    if letter.replay_of:
        DeadLetter.objects.filter(task_id=letter.replay_of).update(
            replay_outcome=DeadLetter.Outcome.FAILED
        )
    job_event(
        "dead_lettered",
        task_id=task_id,
        task_name=task.name,
        queue=letter.queue,
        attempt=letter.attempts,
        reason=letter.reason,
    )
    return letter


def dead_letter_unpublishable(*, message: OutboxMessage, error: str) -> DeadLetter:
    """The outbox gave up publishing `message` (jobs.outbox): the job waits here instead."""
    headers = message.headers or {}
    letter, created = DeadLetter.objects.get_or_create(
        task_id=str(message.task_id),
        defaults={
            "task_name": message.task_name,
            "args": message.args,
            "kwargs": message.kwargs,
            "reason": DeadLetter.Reason.UNPUBLISHABLE,
            "exception_message": error[:5000],
            "attempts": message.failures + 1,
            "correlation_id": str(headers.get(CORRELATION_HEADER, "")),
            "replay_of": str(headers.get(REPLAY_HEADER, "")),
        },
    )
    if created:
        metrics.DEAD_LETTERED.labels(message.task_name, "", letter.reason).inc()
    job_event(
        "dead_lettered", task_id=letter.task_id, task_name=letter.task_name, reason=letter.reason
    )
    return letter


@task_failure.connect
def _on_task_failure(
    sender: Task,
    task_id: str,
    exception: BaseException,
    args: Iterable[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    try:
        dead_letter_record(
            task=sender,
            task_id=task_id,
            exception=exception,
            args=args,
            kwargs=kwargs,
            traceback=str(getattr(einfo, "traceback", "") or ""),
        )
    except Exception:
        # The dead-letter table must never take the worker down with it; the failure is
        # still in the result backend and the logs.
        logger.exception("dead letter: could not record %s[%s]", sender.name, task_id)
    finally:
        # In the worker's main process Celery's Django fixup does not manage connections.
        close_old_connections()


@task_success.connect
def _on_task_success(sender: Task, **_: Any) -> None:
    replay_of = request_header(sender.request, REPLAY_HEADER)
    if replay_of:
        DeadLetter.objects.filter(task_id=replay_of).update(
            replay_outcome=DeadLetter.Outcome.SUCCEEDED
        )


@dataclass(frozen=True)
class Handled:
    done: int
    refused: int  # not in state `dead` (or gone)
    errors: tuple[str, ...] = ()  # could not be handled now: said why, try again later


def _chunks(ids: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def dead_letter_replay(*, ids: Iterable[int], actor: str) -> Handled:
    """Publish each `dead` row again (new task id, `replay_of` header) and record who did.

    Rows are locked for the transaction, so two operators replaying the same rows at
    once publish each row once; rows not `dead` are refused. Large selections go in
    batches, each its own transaction, with a pause between them so a replay of
    thousands does not flood the queues. The tasks are idempotent: a replayed charge
    never charges twice.
    """
    done = refused = 0
    errors: list[str] = []
    # A row is data, not code: only a task this project registers is ever re-sent.
    autodiscover_modules("tasks")
    registered = set(app.tasks)
    batches = list(_chunks(sorted(set(ids)), jobs_settings.REPLAY_BATCH_SIZE))
    for number, batch in enumerate(batches):
        if number:
            # The batch before is published (by this process's publishing thread) before
            # the pause that paces the next one.
            _published()
            time.sleep(jobs_settings.REPLAY_BATCH_PAUSE)
        with transaction.atomic():
            # In id order, as the batches are cut (the model orders newest first).
            rows = list(DeadLetter.objects.select_for_update().filter(pk__in=batch).order_by("pk"))
            refused += len(batch) - len(rows)
            for row in rows:
                if row.task_name not in registered:
                    logger.warning("dead letter %s names no registered task: refused", row.pk)
                    refused += 1
                    continue
                if row.status != DeadLetter.Status.DEAD:
                    refused += 1
                    continue
                headers = {REPLAY_HEADER: row.task_id}
                if row.correlation_id:
                    headers[CORRELATION_HEADER] = row.correlation_id
                try:
                    with transaction.atomic():  # a savepoint: the batch's other rows go on
                        message = outbox.enqueue(
                            row.task_name, args=row.args, kwargs=row.kwargs, headers=headers
                        )
                except QueueNotFound as exc:  # routed to a queue that is not declared
                    logger.warning("dead letter %s cannot be replayed: %r", row.pk, exc)
                    errors.append(
                        f"Dead letter {row.pk} was not replayed: its task routes to a queue "
                        "that is not declared."
                    )
                    continue
                row.status = DeadLetter.Status.REPLAYED
                row.handled_by, row.handled_at = actor, timezone.now()
                row.replay_task_id = str(message.task_id)
                row.replay_outcome = DeadLetter.Outcome.PENDING
                job_event(
                    "replayed",
                    task_id=row.replay_task_id,
                    task_name=row.task_name,
                    queue=row.queue,
                    reason=f"replay of {row.task_id} by {actor}",
                )
                row.save(
                    update_fields=[
                        "status",
                        "handled_by",
                        "handled_at",
                        "replay_task_id",
                        "replay_outcome",
                    ]
                )
                done += 1
    logger.info("dead letters: %s replayed %d, refused %d", actor, done, refused + len(errors))
    return Handled(done=done, refused=refused, errors=tuple(errors))


DiscardHandler = Callable[[DeadLetter, str], None]
_discard_handlers: dict[str, DiscardHandler] = {}


def on_discard(task_name: str) -> Callable[[DiscardHandler], DiscardHandler]:
    """Register what discarding a dead letter of `task_name` means for the business.

    Discarding is a decision, not housekeeping: the job will never run again, so whatever
    waited for it must end (a charge's order is cancelled, a receipt is abandoned). The
    handler gets the row and the actor and runs with no transaction open (it may ask
    another system; a lock must not wait on the network). It raises (a TransientError
    when a dependency cannot be asked) to refuse the discard: the row then stays `dead`,
    but whatever the handler did before it raised stays done, so it must be safe to run
    again, and discarding again finishes the job. Register from your AppConfig.ready().
    """

    def register(handler: DiscardHandler) -> DiscardHandler:
        _discard_handlers[task_name] = handler
        return handler

    return register


def dead_letter_discard(*, ids: Iterable[int], actor: str, consequence: bool = True) -> Handled:
    """Mark `dead` rows discarded (kept for the audit trail until retention), each with
    its business consequence (on_discard); `consequence=False` when the work is over
    already and only its rows are to be closed.

    The consequence runs outside any transaction: it may ask another service (the shop
    asks the payment gateway before it cancels an order), and a row lock or an open
    transaction must not wait on the network. So a consequence must be safe to repeat:
    when it fails, the row stays `dead` and discarding again finishes the job.
    """
    done = refused = 0
    errors: list[str] = []
    for pk in sorted(set(ids)):
        row = DeadLetter.objects.filter(pk=pk, status=DeadLetter.Status.DEAD).first()
        if row is None:
            refused += 1
            continue
        try:
            handler = _discard_handlers.get(row.task_name) if consequence else None
            if handler is not None:
                with operator_call():  # a person waits: no queueing behind the backlog
                    handler(row, actor)
            # Conditional: another operator's replay or discard meanwhile wins the row
            # (the consequence, being repeatable, already held or did no harm).
            marked = DeadLetter.objects.filter(pk=pk, status=DeadLetter.Status.DEAD).update(
                status=DeadLetter.Status.DISCARDED, handled_by=actor, handled_at=timezone.now()
            )
        except TransientError as exc:
            logger.warning("dead letter %s: discard refused: %r", pk, exc)
            errors.append(
                f"Dead letter {pk} was not discarded: {exc.explain()}; it is still "
                "dead, try again (that is safe to repeat)."
            )
            continue
        except Exception:
            logger.exception("dead letter %s: discard failed", pk)
            errors.append(f"Dead letter {pk} was not discarded: an error was logged.")
            continue
        if not marked:
            refused += 1
            continue
        job_event("discarded", task_id=row.task_id, task_name=row.task_name, queue=row.queue)
        done += 1
    logger.info("dead letters: %s discarded %d, refused %d", actor, done, refused + len(errors))
    _published()  # the replay is over when its messages are on their queues
    return Handled(done=done, refused=refused, errors=tuple(errors))


def _published() -> None:
    if not outbox.wait_published():
        logger.warning("dead letter replay: rows still wait to be published; the relay sends them")


def dead_letter_prune(*, older_than_days: int | None = None) -> int:
    """Delete replayed and discarded rows handled before retention. Never `dead` rows."""
    days = jobs_settings.DEAD_LETTER_RETENTION_DAYS if older_than_days is None else older_than_days
    handled: QuerySet[DeadLetter] = DeadLetter.objects.exclude(status=DeadLetter.Status.DEAD)
    return handled.filter(handled_at__lt=timezone.now() - timedelta(days=days)).delete()[0]
