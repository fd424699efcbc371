"""Ending an unpaid order: the one way an order is cancelled, whoever decides it.

An operator (the admin's cancel action, or discarding the charge's dead letter) and the
payment deadline all come here. The gateway is asked first, and asking is closing: the
payment's idempotency key is cancelled at the gateway in the same step that looks for a
charge, so a charge that happened makes the order paid (never cancelled), and a charge
attempt still in flight can no longer succeed after the order was cancelled.
"""

import enum
import logging

from jobs.dead_letters import dead_letter_discard
from jobs.models import DeadLetter
from shop.gateway import client as gateway
from shop.models import Order, Payment
from shop.services.payments import (
    CHARGEABLE,
    charge_description,
    payment_mark_cancelled,
    payment_mark_charged,
    payment_mark_declined,
)

logger = logging.getLogger(__name__)


class Cancelled(enum.StrEnum):
    """What became of a cancellation."""

    CANCELLED = "cancelled"  # the order is cancelled, its stock released
    PAID = "paid"  # the gateway had charged the card: the order is paid instead
    DECLINED = "declined"  # the gateway had declined the card: the order failed
    ALREADY_FINAL = "already_final"  # nothing to do: the order was not pending


def order_cancel(*, order_id: int, actor: str, message: str) -> Cancelled:
    """Cancel a pending order unless the gateway says it was charged.

    `message` is what the customer reads on the order page. Raises TransientError when the
    gateway cannot be asked or did not answer: the order stays pending here (the gateway
    may have cancelled the key already), and calling again finishes it (safe to repeat).
    """
    payment = Payment.objects.select_related("order").filter(order_id=order_id).first()
    if payment is None or payment.status not in CHARGEABLE:
        return Cancelled.ALREADY_FINAL
    if not Order.objects.filter(pk=order_id, status=Order.Status.PENDING).exists():
        return Cancelled.ALREADY_FINAL
    key = str(payment.idempotency_key)
    charge = gateway.charge_cancel(idempotency_key=key)
    if charge is None:
        # The key is cancelled (so it had no charge); a charge under it that the gateway
        # has forgotten (keys live about a day) is still found by its order reference.
        charge = gateway.charge_find(description=charge_description(payment.order))
    if charge is not None and charge.status == "succeeded":
        payment_mark_charged(payment_id=payment.pk, charge_id=charge.id)
        logger.warning(
            "order %s: %s asked to cancel, but the gateway had charged it (%s): paid",
            order_id,
            actor,
            charge.id,
        )
        return Cancelled.PAID
    if charge is not None:
        payment_mark_declined(payment_id=payment.pk, message="Your card was declined.")
        return Cancelled.DECLINED
    if not payment_mark_cancelled(payment_id=payment.pk, message=message):
        return Cancelled.ALREADY_FINAL
    logger.info("order %s cancelled by %s", order_id, actor)
    return Cancelled.CANCELLED


def order_dead_letters_close(*, payment_id: int, actor: str, but: int | None = None) -> None:
    """Discard the `dead` letters of a payment that is over (cancelled, paid, failed): no
    one will ever replay them, and left `dead` they would keep the alert firing."""
    from shop.tasks.payments import charge_payment as charge_payment_task  # imports us

    letters = DeadLetter.objects.filter(
        task_name=charge_payment_task.name, status=DeadLetter.Status.DEAD, args=[payment_id]
    ).values_list("pk", flat=True)
    ids = [pk for pk in letters if pk != but]
    dead_letter_discard(ids=ids, actor=actor, consequence=False)
