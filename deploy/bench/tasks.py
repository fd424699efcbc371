"""Tasks the benchmarks run beside the shop's own; bench workers load them with
`-I deploy.bench.tasks`. Never part of a deployment.

- `bench.noop`: a bare Celery task (no result, no project base class): the ceiling of
  what the broker and a worker can move.
- `bench.probe`: notes the moment its first line runs, for the enqueue -> start latency.
- `bench.naive_charge` / `bench.naive_receipt`: the same pipeline as the shop's, written
  the way a first version would be: `.delay()` after commit with no outbox, early acks,
  plain saves instead of conditional transitions, no claim on the receipt. They do the
  same work (the gateway call, the mail) so the difference is what reliability costs.

Every task a bench worker runs counts its SQL queries (the result backend's included):
`bench:queries` and `bench:tasks` in Redis, per task name, read by scenario 9.
"""

import json
import threading
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import redis
from celery import Task, shared_task, signals
from celery.contrib.django.task import DjangoTask
from django.conf import settings
from django.db import connection
from django.utils import timezone

from jobs.celery import app
from shop.gateway import client as gateway
from shop.models import Order, Payment, Receipt
from shop.services.payments import charge_description
from shop.services.receipts import receipt_deliver

PROBE_KEY = "bench:probe"
QUERIES_KEY, TASKS_KEY = "bench:queries", "bench:tasks"
_counting = threading.local()


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


def _count(execute: Callable[..., Any], *args: Any) -> Any:
    _counting.queries += 1
    return execute(*args)


@signals.task_prerun.connect
def _count_from(**_: Any) -> None:
    _counting.queries = 0
    connection.execute_wrappers.append(_count)


@signals.task_postrun.connect
def _counted(sender: Task, **_: Any) -> None:  # after the result was stored
    if _count in connection.execute_wrappers:
        connection.execute_wrappers.remove(_count)
    pipe = _redis().pipeline()
    pipe.hincrby(QUERIES_KEY, sender.name, _counting.queries)
    pipe.hincrby(TASKS_KEY, sender.name, 1)
    pipe.execute()


@shared_task(name="bench.noop", base=Task, ignore_result=True, track_started=False)
def noop() -> None:
    return None


@shared_task(name="bench.probe", base=Task, ignore_result=True, track_started=False)
def probe(token: str) -> None:
    started = time.time()
    _redis().rpush(PROBE_KEY, json.dumps([token, started]))


@shared_task(name="bench.naive_charge", base=DjangoTask, acks_late=False)
def naive_charge(payment_id: int) -> None:
    payment = Payment.objects.select_related("order").get(pk=payment_id)
    charge = gateway.charge_create(
        idempotency_key=str(payment.idempotency_key),
        amount=payment.amount,
        currency=settings.SHOP_CURRENCY,
        card_token=payment.card_token,
        description=charge_description(payment.order),
    )
    payment.status, payment.gateway_charge_id = Payment.Status.CHARGED, charge.id
    payment.save(update_fields=["status", "gateway_charge_id", "updated_at"])
    order = payment.order
    order.status = Order.Status.PAID
    order.save(update_fields=["status", "updated_at"])
    Receipt.objects.create(order=order)
    naive_receipt.apply_async(args=[order.pk], queue="emails")


@shared_task(name="bench.naive_receipt", base=DjangoTask, acks_late=False)
def naive_receipt(order_id: int) -> None:
    receipt = Receipt.objects.get(order_id=order_id)
    receipt_deliver(receipt=receipt)
    receipt.status, receipt.sent_at = Receipt.Status.SENT, timezone.now()
    receipt.save(update_fields=["status", "sent_at"])
