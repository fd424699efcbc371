"""The base class of every task in the project, and the story of a job told once.

1. Publish after commit. jobs.outbox.enqueue writes an outbox row in the caller's
   transaction; the row is published after COMMIT, or later by the relay.
2. Ack after running. acks_late with prefetch 1 (settings): a worker that dies
   mid-task leaves the message to be delivered again, so "ran twice" is normal and
   every task is idempotent (unique constraints, conditional updates).
3. Retry what may heal. A TransientError (timeout, connection refused, a 5xx), and
   any unexpected exception (a bug), is retried with exponential backoff and equal
   jitter (jobs.retry.backoff), at most `max_retries` times (not Celery's
   `autoretry_for`, whose backoff is full jitter: jobs/NOTES.md says why): with the defaults for at
   least 14 minutes, so an ordinary outage of a dependency dead-letters nothing. The
   longest wait stays below half the broker's visibility timeout (a system check
   refuses to start otherwise). Each run has a deadline, its soft time limit
   (jobs.deadline): clients cap their timeouts by what is left, so a hung call ends on a
   pool that enforces no time limits too.
   A call a dependency's rate limit or open circuit breaker holds back
   (jobs.dependencies.Deferred) was never made: the task runs again later as the same
   attempt, spending no retry (ReliableTask.defer).
4. Fail fast on what cannot. A PermanentError (a request the dependency rejects as
   invalid, a row that must exist and does not) is not retried, nor is a soft time
   limit (the same work would run out of time again). An expected business
   outcome (a declined card) is not an error at all: the task records it and returns.
5. Dead-letter. Every terminal failure (retries exhausted, permanent error, hard time
   limit, pool child lost every time, poison message) becomes one DeadLetter row,
   written by the task_failure receiver in jobs.dead_letters.
6. Decide. An operator replays a dead letter (the replay goes through the outbox with a
   new task id and a link to the original) or discards it, which means what the
   project registered with jobs.dead_letters.on_discard (the shop cancels the order).

The signal receivers that act on a task along the way, and where they live:

- before_task_publish: stamps the publish time, so queue wait is measured
  (jobs.lifecycle._stamp_sent_at).
- task_prerun: binds the correlation id and logs `started` (jobs.lifecycle._on_prerun);
  applies Django's connection rules (jobs.connections._close_old_connections).
- task_postrun: times the run, clears the correlation id (jobs.lifecycle._on_postrun);
  the connection rules again (jobs.connections).
- task_success: counts it (jobs.lifecycle._on_success); records on the dead letter a
  replay came from that the replay succeeded (jobs.dead_letters._on_task_success).
- task_retry: counts and logs it (jobs.lifecycle._on_retry); for send_receipt, gives back
  the claim of a pool child that died holding it (shop.tasks.emails).
- task_failure: counts it (jobs.lifecycle._on_failure); writes the dead letter
  (jobs.dead_letters._on_task_failure); for the sales report, closes its run
  (shop.tasks.reports._report_failed).
- worker_init, beat_init: refuse to start with a redelivery loop, or a pool that cannot
  bound the tasks of its queues (jobs.checks); beat_init also makes SIGTERM stop beat
  between ticks, its schedule saved once, and turns off beat's `task-sent` events
  (jobs.celery._stop_between_ticks, _send_quietly);
  worker_ready: serves the worker's metrics when configured (jobs.lifecycle).
"""

import json
from typing import Any

from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from jobs import deadline
from jobs.conf import jobs_settings
from jobs.dependencies import DEFERRALS_HEADER, SLOTS_HEADER, Deferred, carried, reserved_slots
from jobs.errors import PermanentError, PoisonMessage
from jobs.poison import delivery_count, delivery_finished
from jobs.retry import RetryPolicy


class ReliableTask(DjangoTask):
    """Options a task sets itself (``@shared_task(base=ReliableTask, max_retries=3,
    retry_backoff=5, retry_backoff_max=60)``) win; otherwise the JOBS_RETRY_* settings
    apply (jobs/conf.py), read when a task needs them, not at import time. The names are
    Celery's, but the backoff is jobs' equal jitter (jobs/retry.py says why)."""

    acks_late = True
    # True when every network call the task makes caps its timeouts by what is left of the
    # run (jobs.deadline.capped): it then ends within its soft time limit on a pool that
    # enforces no time limits (threads), and the start-up check lets such a pool run it.
    bounded_calls = False

    # Read by Celery itself: Task.retry() and the worker-lost retry (which waits
    # default_retry_delay) both stop at max_retries, then the task FAILS. Properties, so
    # the settings count when read; a task's own value (a class attribute of the task
    # Celery builds) shadows them.
    @property
    def max_retries(self) -> int | None:
        return int(jobs_settings.RETRY_MAX_RETRIES)

    @property
    def default_retry_delay(self) -> float:
        return self.retry_policy().base

    def retry_policy(self) -> RetryPolicy:
        default = RetryPolicy.from_settings()
        return RetryPolicy(
            max_retries=self.max_retries,
            base=_own(self, "retry_backoff", default.base),
            cap=_own(self, "retry_backoff_max", default.cap),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return self._run(*args, **kwargs)
        task_id, retries = request.id, request.retries
        deliveries = delivery_count(task_id, retries)
        try:
            if deliveries is not None and deliveries > jobs_settings.POISON_MAX_DELIVERIES:
                raise PoisonMessage(
                    f"delivered {deliveries} times without finishing: it kills its worker"
                )
            # What earlier deferrals booked for this run (jobs.dependencies).
            with carried(*_deferral_headers(request)):
                return self._run(*args, **kwargs)
        finally:
            # Reached unless the process died: this delivery is not a poison suspect.
            delivery_finished(task_id, retries)

    def run_budget(self) -> float | None:
        """Seconds this run may take: the soft time limit (the message's own, else the
        task's), else the hard one (jobs.deadline)."""
        hard, soft = self.request.timelimit or (None, None)
        limits = [soft or self.soft_time_limit, hard or self.time_limit]
        return min((limit for limit in limits if limit), default=None)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with deadline.running(self.run_budget()):
                return super().__call__(*args, **kwargs)
        except Deferred as exc:
            if self.request.called_directly or self.request.is_eager:
                raise  # no broker to come back through
            raise self.defer(exc) from exc
        except (Retry, Ignore, Reject, PermanentError, SoftTimeLimitExceeded):
            # A soft time limit is not a blip: the same work would run out of time again
            # (a task whose call may time out and heal converts it, as charge_payment does).
            raise
        except Exception as exc:
            if self.request.called_directly:
                raise
            # Raises Retry after publishing the next attempt, or re-raises `exc` once
            # max_retries is reached, which fails the task (-> dead letter).
            raise self.retry(
                exc=exc,
                countdown=self.retry_policy().delay(self.request.retries),
                max_retries=self.max_retries,
            ) from exc

    def defer(self, exc: Deferred) -> Retry:
        """Run again in ``exc.delay`` seconds (capped by the retry policy's cap, which the
        start-up check keeps below half the visibility timeout) as the same attempt: a
        call that was never made spends no retry. Returns the Retry to raise; the worker
        records it as Celery's RETRY state and acks this delivery. As with Celery's own
        retry(), a publish that fails rejects the message (the reconciler finds the order)."""
        # At least a second: the copy must not start before this run has ended (its
        # bookkeeping is by task id); a slot booked for it waits for it meanwhile.
        countdown = max(1.0, min(exc.delay, self.retry_policy().cap))
        request = self.request
        # The slots this run still holds: one it used (admit pops it) is not carried
        # on, or the next run would go at once on a turn already spent.
        slots = reserved_slots()
        _, deferrals = _deferral_headers(request)
        if exc.slot is not None:
            slots[exc.dependency] = exc.slot
        headers = {
            **(request.headers or {}),
            SLOTS_HEADER: json.dumps(slots),
            DEFERRALS_HEADER: deferrals + 1,
        }
        signature = self.signature_from_request(
            request, countdown=countdown, retries=request.retries, headers=headers
        )
        # The copy is the same delivery's successor: its count starts again.
        delivery_finished(request.id, request.retries)
        try:
            signature.apply_async()
        except Exception as error:
            raise Reject(error, requeue=False) from error
        return Retry(exc=exc, when=countdown, sig=signature)


def _deferral_headers(request: Any) -> tuple[dict[str, float], int]:
    """The slots booked for this run by its earlier deferrals, and how many in a row."""

    def header(name: str) -> Any:
        value = getattr(request, name, None)
        return value if value is not None else (getattr(request, "headers", None) or {}).get(name)

    try:
        slots = {str(k): float(v) for k, v in json.loads(header(SLOTS_HEADER) or "{}").items()}
        deferrals = int(header(DEFERRALS_HEADER) or 0)
    except (TypeError, ValueError, AttributeError):
        return {}, 0  # a header someone else wrote: start afresh
    return slots, deferrals


def _own(task: ReliableTask, name: str, default: float) -> float:
    """The task's own value of a Celery option, or `default` when it set none (Celery's
    Task defines retry_backoff and retry_backoff_max for every task)."""
    for klass in type(task).__mro__:
        if klass is ReliableTask:
            return default
        value = klass.__dict__.get(name)
        if value is not None and not isinstance(value, bool):
            return float(value)
    return default
