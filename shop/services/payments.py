"""Charging a payment: safe to run twice, concurrently, late, or after a crash.

Each transition is a conditional UPDATE from the states it expects; whoever loses the
race updates nothing and stops. The gateway sees the payment's idempotency key, so two
runs that both reach it still make one charge.
"""

import logging
import re
from datetime import datetime

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from jobs.dependencies import Deferred
from jobs.errors import PermanentError, TransientError
from jobs.outbox import enqueue
from shop.gateway import client as gateway
from shop.models import Order, OrderLine, Payment, Product, Receipt
from shop.tasks.emails import send_receipt as send_receipt_task

logger = logging.getLogger(__name__)

CHARGEABLE = [Payment.Status.PENDING, Payment.Status.UNKNOWN]
CANCELLED_MESSAGE = "This order was cancelled: its payment could not be completed."


def payment_charge(*, payment_id: int) -> None:
    """Charge the payment once; on success mark it paid and enqueue the receipt."""
    payment = Payment.objects.select_related("order").filter(pk=payment_id).first()
    if payment is None:
        raise PermanentError(f"payment {payment_id} does not exist")
    if payment.status not in CHARGEABLE:
        logger.info("payment %s is already %s: nothing to do", payment_id, payment.status)
        return
    key, description = str(payment.idempotency_key), charge_description(payment.order)
    # From here the request may reach the gateway, and this process may die before the
    # answer (a lost worker, a hard time limit): `unknown` says so before it happens, and
    # every attempt that finds `unknown` asks the gateway before charging.
    marked_at = timezone.now()
    rows = Payment.objects.filter(pk=payment_id)
    claim = {"status": Payment.Status.UNKNOWN, "updated_at": marked_at}
    first = rows.filter(status=Payment.Status.PENDING).update(**claim)
    # Every attempt says it is alive: the reconciler re-enqueues only payments that no
    # attempt touched for RECONCILE_AFTER_MINUTES (a replay's retries included). Only an
    # `unknown` one is touched: a deferred first attempt may have put it back to
    # `pending` meanwhile, and then this attempt is the first again.
    if not first and not rows.filter(status=Payment.Status.UNKNOWN).update(updated_at=marked_at):
        first = rows.filter(status=Payment.Status.PENDING).update(**claim)
        if not first:
            logger.info("payment %s was settled meanwhile: nothing to do", payment_id)
            return
    try:
        charge = None
        if not first:
            charge = gateway.charge_lookup(idempotency_key=key, description=description)
        if charge is None:
            charge = gateway.charge_create(
                idempotency_key=key,
                amount=payment.amount,
                currency=settings.SHOP_CURRENCY,
                card_token=payment.card_token,
                description=description,
            )
    except gateway.CardDeclined as exc:
        # A business outcome, not a failure: the task did its job (no retry, no dead letter).
        payment_mark_declined(payment_id=payment_id, message=str(exc))
        return
    except gateway.ChargeCancelled:
        # Cancelled at the gateway (an operator, the payment deadline); finish the
        # cancellation here in case the process that asked for it died before doing so.
        payment_mark_cancelled(payment_id=payment_id, message=CANCELLED_MESSAGE)
        return
    except Deferred:
        # Held back by the rate limit or the breaker, or refused with a 429: nothing was
        # sent that charged. A first attempt puts the payment back to `pending`, so the
        # next one charges without asking first (asking would spend calls of the limit),
        # unless another attempt touched it since (that one then owns the `unknown`;
        # touching needs `unknown`, so an attempt after the revert claims `pending`).
        if first:
            rows.filter(status=Payment.Status.UNKNOWN, updated_at=marked_at).update(
                status=Payment.Status.PENDING
            )
        raise
    except (gateway.OutcomeUnknown, SoftTimeLimitExceeded) as exc:
        raise TransientError(f"outcome of the charge is unknown: {exc!r}") from exc
    if charge.status == "declined":
        payment_mark_declined(payment_id=payment_id, message="Your card was declined.")
        return
    payment_mark_charged(payment_id=payment_id, charge_id=charge.id)


def charge_description(order: Order) -> str:
    """What the gateway's ledger says a charge is for: how a charge is found again once
    the gateway forgot its idempotency key (the reference makes it unique across
    databases), and how the reconciler matches the ledger (by the number: order_number)."""
    return f"Order #{order.pk} ({order.reference})"


_ORDER_NUMBER = re.compile(r"^Order #(\d+)\b")


def order_number(description: str) -> int | None:
    """The order number a charge_description() names; None for any other description."""
    match = _ORDER_NUMBER.match(description)
    return int(match.group(1)) if match else None


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
    return _end(payment_id, Payment.Status.DECLINED, Order.Status.FAILED, message)


def payment_mark_cancelled(*, payment_id: int, message: str) -> bool:
    """pending|unknown -> cancelled, order -> cancelled, reserved stock released.

    Only after the gateway cancelled the key (charge_cancel): no later attempt can charge.
    """
    return _end(payment_id, Payment.Status.CANCELLED, Order.Status.CANCELLED, message)


def _end(payment_id: int, payment_status: str, order_status: str, message: str) -> bool:
    """A payment that will never be charged, and its order: one transaction. Returns
    False when the payment was not chargeable any more (nothing is written then)."""
    now = timezone.now()
    with transaction.atomic():
        won = Payment.objects.filter(pk=payment_id, status__in=CHARGEABLE).update(
            status=payment_status, failure_message=message[:300], updated_at=now
        )
        if not won:
            return False
        order_id = Payment.objects.values_list("order_id", flat=True).get(pk=payment_id)
        _close_order(order_id, order_status, now)
    logger.info("payment %s %s: %s", payment_id, payment_status, message)
    return True


def _close_order(order_id: int, status: str, now: datetime) -> None:
    """pending -> failed|cancelled, and its reserved stock back on the shelf.

    The conditional UPDATE is the guard: only the run that moves the order out of
    `pending` releases the stock, so it is released exactly once.
    """
    closed = Order.objects.filter(pk=order_id, status=Order.Status.PENDING).update(
        status=status, updated_at=now
    )
    if closed:
        for product_id, quantity in OrderLine.objects.filter(order_id=order_id).values_list(
            "product_id", "quantity"
        ):
            Product.objects.filter(pk=product_id).update(stock=F("stock") + quantity)
