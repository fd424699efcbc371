"""The shop's reconciliation checks (registered with jobs.reconcile at start-up).

Safe to repair: re-enqueue send_receipt or charge_payment through the outbox; both are
idempotent (a claimed receipt, an idempotency key at the gateway). Never repaired, only
reported: anything involving money that already moved (a double charge, a charge with no
paid order); a person decides about refunds.
"""

import re
from collections import Counter
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from jobs.models import DeadLetter
from jobs.outbox import enqueue
from jobs.reconcile import Result, reconciler
from shop.gateway import client as gateway
from shop.models import Order, Payment, Receipt
from shop.tasks.emails import send_receipt as send_receipt_task
from shop.tasks.payments import charge_payment as charge_payment_task

ORDER_REF = re.compile(r"^Order #(\d+)$")  # the description charge_create sends


def _cutoff() -> datetime:
    return timezone.now() - timedelta(minutes=settings.RECONCILE_AFTER_MINUTES)


def _dead(task_name: str, arg: int) -> bool:
    """An operator owns it: the job is in the dead-letter table, waiting for a decision."""
    return DeadLetter.objects.filter(
        task_name=task_name, status=DeadLetter.Status.DEAD, args=[arg]
    ).exists()


@reconciler.register("paid_without_receipt", "Paid orders whose receipt was not sent")
def paid_without_receipt(*, repair: bool) -> Result:
    stale = Q(receipt__isnull=True) | ~Q(receipt__status=Receipt.Status.SENT)
    orders = list(
        Order.objects.filter(stale, status=Order.Status.PAID, updated_at__lt=_cutoff()).values_list(
            "pk", flat=True
        )
    )
    repaired = 0
    for order_id in orders:
        if repair and not _dead(send_receipt_task.name, order_id):
            Receipt.objects.get_or_create(order_id=order_id)
            enqueue(send_receipt_task, args=[order_id])
            repaired += 1
    return Result(found=len(orders), repaired=repaired, samples=[f"order {o}" for o in orders])


@reconciler.register("payment_stuck", "Payments pending or unknown past the threshold")
def payment_stuck(*, repair: bool) -> Result:
    payments = list(
        Payment.objects.filter(
            status__in=[Payment.Status.PENDING, Payment.Status.UNKNOWN], updated_at__lt=_cutoff()
        ).values_list("pk", flat=True)
    )
    repaired = 0
    for payment_id in payments:
        if repair and not _dead(charge_payment_task.name, payment_id):
            enqueue(charge_payment_task, args=[payment_id])  # same idempotency key: safe
            repaired += 1
    return Result(
        found=len(payments), repaired=repaired, samples=[f"payment {p}" for p in payments]
    )


@reconciler.register(
    "ledger_mismatch",
    "Gateway charges without a paid order, paid orders with zero or several charges",
)
def ledger_mismatch(*, repair: bool) -> Result:
    """Compare the shop's paid orders with the processor's own ledger. Report only."""
    cutoff = _cutoff()
    charged: Counter[int] = Counter()
    samples = []
    for charge in gateway.charges_list():
        if charge.get("status") != "succeeded":
            continue
        match = ORDER_REF.match(str(charge.get("description", "")))
        if match is None:
            samples.append(f"charge {charge.get('id')}: no order reference")
        else:
            charged[int(match.group(1))] += 1
    paid = set(Order.objects.filter(status=Order.Status.PAID).values_list("pk", flat=True))
    settled_paid = Order.objects.filter(pk__in=paid, updated_at__lt=cutoff)
    samples += [f"order {o}: {n} charges" for o, n in sorted(charged.items()) if n > 1]
    samples += [
        f"order {o}: paid, no charge"
        for o in settled_paid.values_list("pk", flat=True)
        if not charged[o]
    ]
    unpaid = Order.objects.filter(pk__in=charged, created_at__lt=cutoff).exclude(pk__in=paid)
    samples += [f"order {o}: charged, not paid" for o in unpaid.values_list("pk", flat=True)]
    return Result(found=len(samples), samples=samples)


@reconciler.register("receipt_resent", "Receipts that may have been mailed more than once")
def receipt_resent(*, repair: bool) -> Result:
    """A claim taken over after its lease means the first sender may have mailed it
    before dying. The Message-ID is the same, so a provider can drop the duplicate."""
    receipts = list(
        Receipt.objects.filter(status=Receipt.Status.SENT, attempts__gt=1).values_list(
            "order_id", flat=True
        )
    )
    return Result(found=len(receipts), samples=[f"order {o}" for o in receipts])
