"""What an operator's decisions on dead letters mean for the shop (registered at start-up).

Discarding a dead letter says "this job will never run": whatever waited for it ends.
A charge's order is cancelled (the gateway is asked first: a charge that happened makes
the order paid), its stock released; a receipt is abandoned. Nothing automatic (the
reconciler, the relay, a replay) runs the job again afterwards.
"""

from jobs.dead_letters import on_discard
from jobs.models import DeadLetter
from shop.models import Payment, Receipt
from shop.services.orders import order_cancel, order_dead_letters_close
from shop.services.payments import CANCELLED_MESSAGE
from shop.tasks.emails import send_receipt as send_receipt_task
from shop.tasks.payments import charge_payment as charge_payment_task


@on_discard(charge_payment_task.name)
def charge_discarded(letter: DeadLetter, actor: str) -> None:
    [payment_id] = letter.args
    order_id = Payment.objects.filter(pk=payment_id).values_list("order_id", flat=True).first()
    if order_id is not None:
        order_cancel(order_id=order_id, actor=actor, message=CANCELLED_MESSAGE)
        # Other dead letters of the same charge (an earlier copy, a replay that failed
        # again) are over too: left `dead`, nobody would decide them and the alert stays.
        order_dead_letters_close(payment_id=payment_id, actor=actor, but=letter.pk)


@on_discard(send_receipt_task.name)
def receipt_discarded(letter: DeadLetter, actor: str) -> None:
    [order_id] = letter.args
    Receipt.objects.filter(order_id=order_id).exclude(status=Receipt.Status.SENT).update(
        status=Receipt.Status.ABANDONED
    )
