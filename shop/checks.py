"""Start-up checks of the shop's own settings."""

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register


@register("shop")
def reconciler_waits_out_the_retries(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The reconciler re-enqueues payments and receipts that look stuck. One that looks
    stuck only because its task is still retrying would get a second copy of its job,
    with a retry budget of its own: twice the traffic at a recovering gateway, and two
    dead letters for one payment. So it must look only past the longest retry budget."""
    from shop.tasks.emails import send_receipt
    from shop.tasks.payments import charge_payment

    # The tasks the reconciler re-enqueues, with their own policies (a task may set one).
    at_most = max(task.retry_policy().budget()[1] for task in (charge_payment, send_receipt))
    waits = settings.RECONCILE_AFTER_MINUTES * 60
    if waits > at_most:
        return []
    return [
        Error(
            f"RECONCILE_AFTER_MINUTES ({settings.RECONCILE_AFTER_MINUTES}) is not longer than "
            f"the retry budget ({at_most:g} s at most): the reconciler would start a second "
            "copy of jobs that are still retrying.",
            hint="Raise RECONCILE_AFTER_MINUTES, or shorten the retry policy.",
            id="shop.E001",
        )
    ]
