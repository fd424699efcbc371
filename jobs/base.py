"""The base class of every task in the project.

The story of a job, told once:
  1. It is published only after the transaction that asked for it commits
     (jobs.outbox.enqueue writes an outbox row in that transaction).
  2. It is acked only after it ran (acks_late, prefetch 1, see settings): a worker that
     dies mid-task leaves the message to be delivered again, so every task must be
     idempotent ("ran twice" is normal; constraints and conditional updates make it so).
  3. A TransientError is retried with exponential backoff and full jitter, up to
     max_retries; the delay cap stays far below the broker's visibility timeout.
  4. A PermanentError fails at once: no retry budget is burnt on a declined card.
"""

from celery.contrib.django.task import DjangoTask

from jobs.errors import PermanentError, TransientError


class ReliableTask(DjangoTask):
    acks_late = True
    autoretry_for = (TransientError,)
    dont_autoretry_for = (PermanentError,)
    max_retries = 5
    # Delays of about 2, 4, 8, 16, 32 s (full jitter: uniform in 0..delay), capped at 60 s.
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
