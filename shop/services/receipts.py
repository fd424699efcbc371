"""Sending the receipt: claim the row, send, mark sent.

The claim is a conditional UPDATE pending -> sending that names the delivery holding it:
the task id and its attempt number (Celery's `retries`). Whoever finds a live claim leaves
the receipt to its holder and returns: two live deliveries never both send, whether they
are two tasks (the reconciler's and the original) or two copies of one message (published
twice, redelivered), whatever their attempt numbers. A claim changes hands only

- when its holder gives it back: a failed send (pending again, for the task's own retry
  or anyone else), or the worker whose pool child died holding it (receipt_release, from
  the retry Celery sends for a lost worker), so that retry claims at once;
- when the lease has expired: its holder is dead (a whole worker lost), and the
  reconciler or a redelivery takes it over.

Either way it sends again with the same Message-ID, so the duplicate is recognisable.

Each send waits for its turn under the mail server's rate limit, shared by all workers,
and is not made while its circuit breaker is open (MAIL, jobs.dependencies): the task is
deferred before it claims anything.
"""

import logging
import smtplib
from datetime import timedelta

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.db.models import F
from django.template.loader import render_to_string
from django.utils import timezone

from jobs import deadline
from jobs.dependencies import Deferred, Dependency
from jobs.errors import PermanentError, TransientError
from shop.models import Order, Receipt

logger = logging.getLogger(__name__)

# The rate limit and circuit breaker of every send (JOBS_DEPENDENCIES["mail"]).
MAIL = Dependency("mail")

# Longer than send_receipt's hard time limit: a claim this old belongs to a dead worker.
CLAIM_LEASE = timedelta(seconds=60)
SETTLED = [Receipt.Status.SENT, Receipt.Status.ABANDONED]


def receipt_send(*, order_id: int, claimant: str = "", attempt: int = 0) -> None:
    """Send the order's receipt once. `claimant` and `attempt` name this delivery (the
    task id and its retry number); without them every other claim counts as live."""
    receipt = Receipt.objects.filter(order_id=order_id).first()
    if receipt is None:
        # Written in the same transaction that enqueued this task: it must exist.
        raise PermanentError(f"order {order_id} has no receipt to send")
    if receipt.status in SETTLED:
        return
    try:
        MAIL.admit()  # Deferred: this send's turn is far off, or the mail server is down
    except Deferred:
        # Alive, only waiting: the reconciler resends receipts of orders nothing touched
        # for RECONCILE_AFTER_MINUTES, and a deferral can last longer than the retries.
        Order.objects.filter(pk=order_id).update(updated_at=timezone.now())
        raise
    now = timezone.now()
    me = f"{claimant}/{attempt}" if claimant else ""
    rows = Receipt.objects.filter(pk=receipt.pk)
    claim = {
        "status": Receipt.Status.SENDING,
        "claimed_at": now,
        "claimed_by": me,
        "attempts": F("attempts") + 1,
    }
    claimed = rows.filter(status=Receipt.Status.PENDING).update(**claim)
    if not claimed:
        # A dead holder's expired claim: whether its mail went is not known.
        expired = rows.filter(status=Receipt.Status.SENDING, claimed_at__lt=now - CLAIM_LEASE)
        claimed = expired.update(**claim, unconfirmed_sends=F("unconfirmed_sends") + 1)
    if not claimed:
        # Sent meanwhile, or a live claim: its holder sends it (or gives it back when its
        # send fails, and retries). Nothing to do here, and no retry budget spent.
        logger.info("receipt for order %s is another delivery's: left to it", order_id)
        MAIL.inconclusive()  # no mail sent: were this the breaker's probe, another probes
        return
    mine = Receipt.objects.filter(pk=receipt.pk, status=Receipt.Status.SENDING, claimed_by=me)
    try:
        receipt_deliver(receipt=receipt)
    except Exception as exc:
        mine.update(status=Receipt.Status.PENDING, claimed_at=None)
        if _mail_server_failed(exc):
            MAIL.failed()
        else:
            MAIL.inconclusive()  # the message's fault, not the server's
        raise TransientError(f"sending the receipt failed: {exc!r}") from exc
    MAIL.succeeded()
    # Even if the lease ran out and another delivery took the claim over, the mail went.
    Receipt.objects.filter(pk=receipt.pk, status=Receipt.Status.SENDING).update(
        status=Receipt.Status.SENT, sent_at=timezone.now()
    )
    logger.info("receipt for order %s sent", order_id)


def _mail_server_failed(exc: Exception) -> bool:
    """A failure that says the mail server is unwell (the breaker counts it): no
    connection, a dropped one, a timeout, a 4xx "try again later". Not a refused
    recipient or a template error."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return False
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    return isinstance(exc, OSError)  # sockets, timeouts; smtplib's errors (disconnected) too


def receipt_release(*, order_id: int, claimant: str, attempt: int) -> bool:
    """Give back the claim of a delivery whose process died holding it (its worker saw
    the pool child die and is retrying the task): the retry then claims at once instead of
    waiting out the lease. The mail may have gone already; the resend has its Message-ID."""
    return bool(
        Receipt.objects.filter(
            order_id=order_id, status=Receipt.Status.SENDING, claimed_by=f"{claimant}/{attempt}"
        ).update(
            status=Receipt.Status.PENDING,
            claimed_at=None,
            unconfirmed_sends=F("unconfirmed_sends") + 1,
        )
    )


def receipt_deliver(*, receipt: Receipt) -> None:
    """Render and send the receipt mail; its Message-ID is derived from the receipt, so a
    resend is recognisable as the same mail."""
    order = Order.objects.prefetch_related("lines__product").get(pk=receipt.order_id)
    body = render_to_string("shop/email/receipt.txt", {"order": order})
    # Each socket operation of the SMTP exchange waits at most what the run has left.
    timeout = deadline.capped(settings.EMAIL_TIMEOUT)
    message = EmailMessage(
        # A send that fails raises (its claim is given back, the task retries). Said
        # here: EmailMessage.send(fail_silently=...) is ignored for a connection given.
        connection=get_connection(timeout=timeout, fail_silently=False),
        subject=f"Your receipt for order #{order.pk}",
        body=body,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[order.email],
        headers={"Message-ID": receipt.message_id},
    )
    message.send()
