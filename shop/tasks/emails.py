from celery import shared_task

from jobs.base import ReliableTask
from shop.services.receipts import receipt_send


@shared_task(
    name="shop.tasks.emails.send_receipt",
    base=ReliableTask,
    bind=True,
    soft_time_limit=25,
    time_limit=30,
)
def send_receipt(self: ReliableTask, order_id: int) -> None:
    receipt_send(order_id=order_id, claimant=self.request.id, attempt=self.request.retries or 0)
