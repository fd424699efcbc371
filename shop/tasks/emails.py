from typing import Any

from billiard.exceptions import WorkerLostError
from celery import shared_task
from celery.signals import task_retry

from jobs.base import ReliableTask
from shop.services.receipts import receipt_release, receipt_send


@shared_task(
    name="shop.tasks.emails.send_receipt",
    base=ReliableTask,
    bind=True,
    soft_time_limit=25,
    time_limit=30,
    bounded_calls=True,  # the mail connection's timeout is capped by the run's deadline
)
def send_receipt(self: ReliableTask, order_id: int) -> None:
    receipt_send(order_id=order_id, claimant=self.request.id, attempt=self.request.retries or 0)


@task_retry.connect(sender=send_receipt)
def _release_a_lost_childs_claim(request: Any = None, reason: Any = None, **_: Any) -> None:
    """Run by the worker itself when a pool child died mid-task and Celery retries it
    (task_retry_on_worker_lost): the dead child's claim is given back for the retry."""
    if isinstance(getattr(reason, "exc", None), WorkerLostError):
        [order_id] = request.args
        receipt_release(order_id=order_id, claimant=request.id, attempt=request.retries or 0)
