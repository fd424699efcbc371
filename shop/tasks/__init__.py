"""Celery tasks of the shop, one module per queue (routes match `shop.tasks.<queue>.*`).

Tasks are thin: they take ids, call one service, and let the base task's policy handle
errors. Import them under a `_task` alias: `from shop.tasks.payments import
charge_payment as charge_payment_task`.
"""

from shop.tasks import emails, payments, reports

__all__ = ("emails", "payments", "reports")
