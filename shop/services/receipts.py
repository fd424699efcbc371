"""Sending the receipt: claim the row, send, mark sent.

The claim is a conditional UPDATE pending -> sending, naming the claiming task. A worker
that dies after sending but before marking leaves `sending`: the retry of the same task
takes its own claim over at once; another task (a duplicate delivery, the reconciler)
waits until the lease expires. Either way it sends again with the same Message-ID, so
the duplicate is recognisable.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.core.mail import EmailMessage
from django.db.models import F, Q
from django.template.loader import render_to_string
from django.utils import timezone

from jobs.errors import PermanentError, TransientError
from shop.models import Order, Receipt

logger = logging.getLogger(__name__)

# Longer than send_receipt's hard time limit: a claim this old belongs to a dead worker.
CLAIM_LEASE = timedelta(seconds=60)


class ReceiptBusy(TransientError):
    """Another worker holds a live claim on this receipt: look again later."""


def receipt_send(*, order_id: int, claimant: str = "") -> None:
    receipt = Receipt.objects.filter(order_id=order_id).first()
    if receipt is None:
        # Written in the same transaction that enqueued this task: it must exist.
        raise PermanentError(f"order {order_id} has no receipt to send")
    if receipt.status == Receipt.Status.SENT:
        return
    now = timezone.now()
    abandoned = Q(claimed_at__lt=now - CLAIM_LEASE)
    if claimant:
        abandoned |= Q(claimed_by=claimant)
    claimable = Q(status=Receipt.Status.PENDING) | (Q(status=Receipt.Status.SENDING) & abandoned)
    claimed = Receipt.objects.filter(claimable, pk=receipt.pk).update(
        status=Receipt.Status.SENDING,
        claimed_at=now,
        claimed_by=claimant,
        attempts=F("attempts") + 1,
    )
    if not claimed:
        if Receipt.objects.filter(pk=receipt.pk, status=Receipt.Status.SENT).exists():
            return
        raise ReceiptBusy(f"receipt for order {order_id} is being sent by another worker")
    try:
        receipt_deliver(receipt=receipt)
    except Exception as exc:
        Receipt.objects.filter(pk=receipt.pk, status=Receipt.Status.SENDING).update(
            status=Receipt.Status.PENDING, claimed_at=None
        )
        raise TransientError(f"sending the receipt failed: {exc!r}") from exc
    Receipt.objects.filter(pk=receipt.pk, status=Receipt.Status.SENDING).update(
        status=Receipt.Status.SENT, sent_at=timezone.now()
    )
    logger.info("receipt for order %s sent", order_id)


def receipt_deliver(*, receipt: Receipt) -> None:
    """Render and send the receipt mail; its Message-ID is derived from the receipt, so a
    resend is recognisable as the same mail."""
    order = Order.objects.prefetch_related("lines__product").get(pk=receipt.order_id)
    body = render_to_string("shop/email/receipt.txt", {"order": order})
    message = EmailMessage(
        subject=f"Your receipt for order #{order.pk}",
        body=body,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[order.email],
        headers={"Message-ID": receipt.message_id},
    )
    message.send(fail_silently=False)
