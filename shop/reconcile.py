"""The shop's reconciliation checks (registered with jobs.reconcile at start-up).

Safe to repair: re-enqueue send_receipt or charge_payment through the outbox; both are
idempotent (a claimed receipt, an idempotency key at the gateway). Work an operator owns
(a `dead` or `discarded` dead letter) is never re-enqueued. An order unpaid past its
deadline is cancelled, the gateway asked first. Never repaired, only
reported: anything involving money that already moved (a double charge, a charge with no
paid order); a person decides about refunds.
"""

import logging
import time
from collections import Counter
from datetime import datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from jobs.errors import TransientError
from jobs.models import DeadLetter
from jobs.outbox import enqueue
from jobs.reconcile import Result, reconciler
from shop.gateway import client as gateway
from shop.models import Order, Payment, Receipt
from shop.services.orders import Cancelled, order_cancel, order_dead_letters_close
from shop.services.payments import CANCELLED_MESSAGE, order_number
from shop.services.receipts import CLAIM_LEASE
from shop.tasks.emails import send_receipt as send_receipt_task
from shop.tasks.payments import charge_payment as charge_payment_task

logger = logging.getLogger(__name__)
# Seconds one run spends cancelling overdue orders (two gateway calls each), well inside
# the reconcile task's soft time limit, so the other checks keep running on a slow gateway.
DEADLINE_RUN_BUDGET = 20.0
DEADLINE_ACTOR = "payment deadline"  # who cancelled, in the logs and the dead letters' audit
# Jobs asked about per query when looking for their dead letters: bounds one query's size.
OWNED_PER_QUERY = 1000


def _cutoff() -> datetime:
    return timezone.now() - timedelta(minutes=settings.RECONCILE_AFTER_MINUTES)


def _operator_owned(task_name: str, args: list[int]) -> set[int]:
    """Which of these jobs an operator owns: its dead letter waits for a decision
    (`dead`), or the decision was to never run it again (`discarded`). Either way, not
    ours to re-run. One query for all of them: a query per job read the task's dead
    letters once per job found (make bench, scenario 10)."""
    owned: set[int] = set()
    for start in range(0, len(args), OWNED_PER_QUERY):
        letters = DeadLetter.objects.filter(
            task_name=task_name,
            status__in=[DeadLetter.Status.DEAD, DeadLetter.Status.DISCARDED],
            args__in=[[arg] for arg in args[start : start + OWNED_PER_QUERY]],
        ).values_list("args", flat=True)
        owned.update(arg for [arg] in letters)  # each job has one argument: its row id
    return owned


def _resend_receipts(orders: list[int], *, repair: bool) -> Result:
    """Enqueue send_receipt for these orders (a receipt row first, if none), except where
    an operator owns the receipt's dead letter."""
    repaired = 0
    owned = _operator_owned(send_receipt_task.name, orders) if repair else set()
    for order_id in orders:
        if repair and order_id not in owned:
            Receipt.objects.get_or_create(order_id=order_id)
            enqueue(send_receipt_task, args=[order_id])
            repaired += 1
    return Result(found=len(orders), repaired=repaired, samples=[f"order {o}" for o in orders])


@reconciler.register("paid_without_receipt", "Paid orders whose receipt was not sent")
def paid_without_receipt(*, repair: bool) -> Result:
    settled = [Receipt.Status.SENT, Receipt.Status.ABANDONED]  # abandoned: an operator's call
    stale = Q(receipt__isnull=True) | ~Q(receipt__status__in=settled)
    orders = list(
        Order.objects.filter(stale, status=Order.Status.PAID, updated_at__lt=_cutoff()).values_list(
            "pk", flat=True
        )
    )
    return _resend_receipts(orders, repair=repair)


@reconciler.register("receipt_claim_expired", "Receipts claimed by a delivery that died")
def receipt_claim_expired(*, repair: bool) -> Result:
    # A claim past its lease is a dead delivery's, unambiguously (the lease outlasts the
    # task's hard time limit), so this does not wait for RECONCILE_AFTER_MINUTES. A copy
    # of that same delivery (a redelivery after its worker was lost) found the claim live
    # and left it: without this check the receipt would wait for paid_without_receipt.
    expired = Receipt.objects.filter(
        status=Receipt.Status.SENDING, claimed_at__lt=timezone.now() - CLAIM_LEASE
    )
    return _resend_receipts(list(expired.values_list("order_id", flat=True)), repair=repair)


@reconciler.register("payment_stuck", "Payments pending or unknown past the threshold")
def payment_stuck(*, repair: bool) -> Result:
    payments = list(
        Payment.objects.filter(
            status__in=[Payment.Status.PENDING, Payment.Status.UNKNOWN],
            order__status=Order.Status.PENDING,
            updated_at__lt=_cutoff(),
        ).values_list("pk", flat=True)
    )
    repaired = 0
    owned = _operator_owned(charge_payment_task.name, payments) if repair else set()
    for payment_id in payments:
        if repair and payment_id not in owned:
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
        number = order_number(str(charge.get("description", "")))
        if number is None:
            samples.append(f"charge {charge.get('id')}: no order reference")
        else:
            charged[number] += 1
    # Both sides are compared in this process, and the database is asked only about the
    # few charges without a paid order: the paid orders as a list of ids in a query
    # (`pk__in`, twice) cost 27 s of a 36 s check at 500,000 orders (make bench,
    # scenario 10).
    paid = set(Order.objects.filter(status=Order.Status.PAID).values_list("pk", flat=True))
    settled_paid = Order.objects.filter(status=Order.Status.PAID, updated_at__lt=cutoff)
    samples += [f"order {o}: {n} charges" for o, n in sorted(charged.items()) if n > 1]
    samples += [
        f"order {o}: paid, no charge"
        for o in settled_paid.values_list("pk", flat=True)
        if not charged[o]
    ]
    # An old order whose payment an attempt touched lately may have a charge the shop is
    # still recording (a replay hours later, its answer lost: the retry asks the gateway),
    # so its age counts from the last attempt, as payment_stuck counts it. Reported at
    # once, the charge would be refunded by hand (the runbook) and the order then shipped.
    unpaid = (
        Order.objects.filter(pk__in=[o for o in charged if o not in paid], created_at__lt=cutoff)
        .exclude(status=Order.Status.PAID)
        .exclude(payment__updated_at__gte=cutoff)
    )
    samples += [f"order {o}: charged, not paid" for o in unpaid.values_list("pk", flat=True)]
    return Result(found=len(samples), samples=samples)


@reconciler.register("receipt_resent", "Receipts that may have been mailed more than once")
def receipt_resent(*, repair: bool) -> Result:
    """A claim that ended without knowing whether its mail went (its delivery died holding
    it: given back, or taken over after the lease) means the mail may have gone twice. The
    Message-ID is the same, so a provider can drop the duplicate. A failed send that said
    so is not counted: it mailed nothing."""
    receipts = list(
        Receipt.objects.filter(status=Receipt.Status.SENT, unconfirmed_sends__gt=0).values_list(
            "order_id", flat=True
        )
    )
    return Result(found=len(receipts), samples=[f"order {o}" for o in receipts])


# Registered last: the checks above report or re-enqueue quickly, and run even when the
# gateway is slow enough to use up this one's time budget.
@reconciler.register("unpaid_past_deadline", "Orders still unpaid after ORDER_PAYMENT_DEADLINE")
def unpaid_past_deadline(*, repair: bool) -> Result:
    """The deadline of every unpaid order, whoever holds it (a retrying charge, a dead
    letter nobody decided on). Counted from the order, or from an operator's replay of
    its charge if that came later: a replay is a decision to try again, and the deadline
    must not cancel it at once. Repair cancels, asking the gateway first (a charge that
    happened makes the order paid), and closes the charge's dead letters."""
    deadline = timezone.now() - timedelta(seconds=settings.ORDER_PAYMENT_DEADLINE)
    replayed = {
        payment_id
        for [payment_id] in DeadLetter.objects.filter(
            task_name=charge_payment_task.name,
            status=DeadLetter.Status.REPLAYED,
            handled_at__gte=deadline,
        ).values_list("args", flat=True)
    }
    overdue = [
        (order_id, payment_id)
        for order_id, payment_id in Order.objects.filter(
            status=Order.Status.PENDING, created_at__lt=deadline
        ).values_list("pk", "payment__pk")
        if payment_id not in replayed
    ]
    repaired, unanswered, failed, left = 0, [], [], 0
    stop_at = time.monotonic() + DEADLINE_RUN_BUDGET
    for order_id, payment_id in overdue if repair else ():
        if time.monotonic() > stop_at:  # a slow gateway: the rest wait for the next run
            left += 1
            continue
        try:
            outcome = order_cancel(
                order_id=order_id, actor=DEADLINE_ACTOR, message=CANCELLED_MESSAGE
            )
        except TransientError:
            unanswered.append(order_id)  # the next run tries again
            continue
        except SoftTimeLimitExceeded:
            raise  # the run is out of time: not one order's problem
        except Exception:
            # One order's problem must not stop the deadline of all the others.
            logger.exception("reconcile: order %s could not be cancelled", order_id)
            failed.append(order_id)  # tried again by the next run, and logged each time
            continue
        order_dead_letters_close(payment_id=payment_id, actor=DEADLINE_ACTOR)
        repaired += outcome != Cancelled.ALREADY_FINAL
    if overdue and len(unanswered) + len(failed) == len(overdue):
        raise TransientError(f"no overdue order could be cancelled ({len(overdue)} waiting)")
    samples = [f"order {o}" for o, _ in overdue]
    samples += [f"order {o}: not cancelled yet, the gateway did not answer" for o in unanswered]
    samples += [f"order {o}: not cancelled yet, an error was logged" for o in failed]
    if left:
        samples.append(f"{left} more left for the next run (time budget)")
    return Result(found=len(overdue), repaired=repaired, samples=samples)
