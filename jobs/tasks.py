"""Housekeeping tasks of the reliability layer (queue `default`, scheduled by beat).

They send no monitoring events (`send_events=False`; beat sends no `task-sent` either,
jobs.celery): Flower's task list is the shop's work, not a relay every 10 s and a canary
per queue every 30 s. Their runs are in the worker logs and the metrics; their effects
on the Operations page (outbox, canary ages, reconciliation).
"""

from celery import shared_task

from jobs import canary as canaries
from jobs import dead_letters, outbox


@shared_task(name="jobs.tasks.relay_outbox", ignore_result=True, send_events=False)
def relay_outbox() -> int:
    """Publish outbox rows whose after-commit publish did not happen (broker down, crash)."""
    return outbox.relay_all_unsent()


@shared_task(name="jobs.tasks.prune_outbox", ignore_result=True, send_events=False)
def prune_outbox() -> int:
    """Delete sent outbox rows older than the retention period."""
    return outbox.prune_sent()


@shared_task(name="jobs.tasks.prune_dead_letters", ignore_result=True, send_events=False)
def prune_dead_letters() -> int:
    """Delete replayed and discarded dead letters past retention (never `dead` ones)."""
    return dead_letters.dead_letter_prune()


# A canary lands on every queue, so its time limit counts in every worker's grace period:
# it writes one row, and must never be the longest task of a queue.
@shared_task(
    name="jobs.tasks.canary",
    ignore_result=True,
    send_events=False,
    soft_time_limit=5,
    time_limit=10,
)
def canary(queue: str) -> None:
    """Sent to every queue by beat (jobs.canary); records that this queue is consumed."""
    canaries.canary_record(queue)


@shared_task(name="jobs.tasks.reconcile", ignore_result=True, send_events=False)
def reconcile() -> None:
    """Run the project's reconciliation checks (registered by the project's apps)."""
    from jobs.reconcile import reconciler

    reconciler.run(repair=True)
