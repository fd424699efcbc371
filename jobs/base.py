"""The base class of every task in the project, and the story of a job told once.

1. Publish after commit. jobs.outbox.enqueue writes an outbox row in the caller's
   transaction; the row is published after COMMIT, or later by the relay.
2. Ack after running. acks_late with prefetch 1 (settings): a worker that dies
   mid-task leaves the message to be delivered again, so "ran twice" is normal and
   every task is idempotent (unique constraints, conditional updates).
3. Retry what may heal. A TransientError (timeout, connection refused, a 5xx), and
   any unexpected exception (a bug), is retried with exponential backoff and equal
   jitter (jobs.retry.backoff), at most `max_retries` times: with the defaults for at
   least 14 minutes, so an ordinary outage of a dependency dead-letters nothing. The
   longest wait stays below half the broker's visibility timeout (a system check
   refuses to start otherwise).
4. Fail fast on what cannot. A PermanentError (a request the dependency rejects as
   invalid, a row that must exist and does not) is not retried. An expected business
   outcome (a declined card) is not an error at all: the task records it and returns.
5. Dead-letter. Every terminal failure (retries exhausted, permanent error, hard time
   limit, pool child lost every time, poison message) becomes one DeadLetter row,
   written by the task_failure receiver in jobs.dead_letters.
6. Decide. An operator replays a dead letter (the replay goes through the outbox with a
   new task id and a link to the original) or discards it, which means what the
   project registered with jobs.dead_letters.on_discard (the shop cancels the order).
"""

from typing import Any, ClassVar

from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject, Retry
from django.conf import settings

from jobs.errors import PermanentError, PoisonMessage
from jobs.poison import delivery_count, delivery_finished
from jobs.retry import RetryPolicy


class ReliableTask(DjangoTask):
    acks_late = True
    retry_policy: ClassVar[RetryPolicy] = RetryPolicy.from_settings()
    # Read by Celery itself: Task.retry() and the worker-lost retry (which waits
    # default_retry_delay) both stop at max_retries, then the task FAILS.
    max_retries = retry_policy.max_retries
    default_retry_delay = retry_policy.base

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.max_retries = cls.retry_policy.max_retries
        cls.default_retry_delay = cls.retry_policy.base

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return self._run(*args, **kwargs)
        task_id, retries = request.id, request.retries
        deliveries = delivery_count(task_id, retries)
        try:
            if deliveries > settings.JOBS_POISON_MAX_DELIVERIES:
                raise PoisonMessage(
                    f"delivered {deliveries} times without finishing: it kills its worker"
                )
            return self._run(*args, **kwargs)
        finally:
            # Reached unless the process died: this delivery is not a poison suspect.
            delivery_finished(task_id, retries)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject, PermanentError):
            raise
        except Exception as exc:
            if self.request.called_directly:
                raise
            # Raises Retry after publishing the next attempt, or re-raises `exc` once
            # max_retries is reached, which fails the task (-> dead letter).
            raise self.retry(
                exc=exc,
                countdown=self.retry_policy.delay(self.request.retries),
                max_retries=self.max_retries,
            ) from exc
