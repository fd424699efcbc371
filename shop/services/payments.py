"""Charging a payment: safe to run twice, concurrently, late, or after a crash.

Each transition is a conditional UPDATE from the states it expects; whoever loses the
race updates nothing and stops. The gateway sees the payment's idempotency key, so two
runs that both reach it still make one charge.
"""

import logging

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from jobs.errors import PermanentError, TransientError
from jobs.outbox import enqueue
from shop.gateway import client as gateway
from shop.models import Order, Payment, Product, Receipt
from shop.tasks.emails import send_receipt as send_receipt_task

logger = logging.getLogger(__name__)

CHARGEABLE = [Payment.Status.PENDING, Payment.Status.UNKNOWN]


def payment_charge(*, payment_id: int) -> None:
    """Charge the payment once; on success mark it paid and enqueue the receipt."""
    payment = Payment.objects.select_related("order").filter(pk=payment_id).first()
    if payment is None:
        raise PermanentError(f"payment {payment_id} does not exist")
    if payment.status not in CHARGEABLE:
        logger.info("payment %s is already %s: nothing to do", payment_id, payment.status)
        return
    key = str(payment.idempotency_key)
    try:
        # After a timeout we do not know whether the card was charged: ask first.
        charge = (
            gateway.charge_lookup(idempotency_key=key)
            if payment.status == Payment.Status.UNKNOWN
            else None
        )
        if charge is None:
            charge = gateway.charge_create(
                idempotency_key=key,
                amount=payment.amount,
                currency="EUR",
                card=payment.card_token,
                description=f"Order #{payment.order_id}",
            )
    except gateway.CardDeclined as exc:
        payment_mark_declined(payment_id=payment_id, message=str(exc))
        raise
    except (gateway.GatewayTimeout, SoftTimeLimitExceeded) as exc:
        _mark_unknown(payment_id)
        raise TransientError(f"outcome of the charge is unknown: {exc!r}") from exc
    if charge.status == "declined":
        payment_mark_declined(payment_id=payment_id, message="Your card was declined.")
        raise gateway.CardDeclined("Your card was declined.")
    payment_mark_charged(payment_id=payment_id, charge_id=charge.id)


def _mark_unknown(payment_id: int) -> None:
    Payment.objects.filter(pk=payment_id, status=Payment.Status.PENDING).update(
        status=Payment.Status.UNKNOWN, updated_at=timezone.now()
    )


def payment_mark_charged(*, payment_id: int, charge_id: str) -> bool:
    """pending|unknown -> charged, order -> paid, receipt row + its job: one transaction.

    Returns False when another run got there first (nothing is written then).
    """
    now = timezone.now()
    with transaction.atomic():
        won = Payment.objects.filter(pk=payment_id, status__in=CHARGEABLE).update(
            status=Payment.Status.CHARGED, gateway_charge_id=charge_id, updated_at=now
        )
        if not won:
            return False
        order_id = Payment.objects.values_list("order_id", flat=True).get(pk=payment_id)
        Order.objects.filter(pk=order_id, status=Order.Status.PENDING).update(
            status=Order.Status.PAID, updated_at=now
        )
        Receipt.objects.create(order_id=order_id)
        enqueue(send_receipt_task, args=[order_id])
    logger.info("payment %s charged (%s), order %s paid", payment_id, charge_id, order_id)
    return True


def payment_mark_declined(*, payment_id: int, message: str) -> bool:
    """pending|unknown -> declined, order -> failed, reserved stock released."""
    now = timezone.now()
    with transaction.atomic():
        won = Payment.objects.filter(pk=payment_id, status__in=CHARGEABLE).update(
            status=Payment.Status.DECLINED, failure_message=message[:300], updated_at=now
        )
        if not won:
            return False
        order_id = Payment.objects.values_list("order_id", flat=True).get(pk=payment_id)
        failed = Order.objects.filter(pk=order_id, status=Order.Status.PENDING).update(
            status=Order.Status.FAILED, updated_at=now
        )
        if failed:
            order = Order.objects.prefetch_related("lines").get(pk=order_id)
            for line in order.lines.all():
                Product.objects.filter(pk=line.product_id).update(stock=F("stock") + line.quantity)
    logger.info("payment %s declined: %s", payment_id, message)
    return True
