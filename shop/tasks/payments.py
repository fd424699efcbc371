from celery import shared_task

from jobs.base import ReliableTask

# The module, not the function: shop.services.payments enqueues the receipt task, so the
# two modules import each other, and a module reference resolves at call time.
from shop.services import payments


# The gateway read timeout (15 s) fires before the soft limit (20 s) in the normal case;
# either way the payment is already `unknown` (marked before the call), so the next
# attempt asks the gateway before charging.
@shared_task(
    name="shop.tasks.payments.charge_payment",
    base=ReliableTask,
    soft_time_limit=20,
    time_limit=30,
    bounded_calls=True,  # every gateway call is capped by the run's deadline (the client)
)
def charge_payment(payment_id: int) -> None:
    payments.payment_charge(payment_id=payment_id)
