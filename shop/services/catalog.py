"""The catalog's stock, as operators change it: by adding or removing units, never by
writing a number back. A number read earlier would erase the reservations made since."""

from django.db import transaction
from django.db.models import F
from django.utils.translation import ngettext

from shop.models import Product


class StockWouldGoNegative(Exception):
    """Removing more units than the product has now: nothing was changed."""

    def __init__(self, *, product_id: int, delta: int, stock: int) -> None:
        message = ngettext(
            "Cannot remove %(count)d unit: only %(stock)d in stock.",
            "Cannot remove %(count)d units: only %(stock)d in stock.",
            -delta,
        ) % {"count": -delta, "stock": stock}
        super().__init__(message)
        self.product_id = product_id
        self.delta = delta
        self.stock = stock


def product_stock_adjust(*, product_id: int, delta: int) -> int:
    """Add `delta` units (negative removes) to the current stock and return the new stock.

    One conditional UPDATE is both the check and the change, as a checkout's reservation
    is, so concurrent adjustments and orders all count and none can take stock below zero.
    Raises StockWouldGoNegative (nothing changed) or Product.DoesNotExist.
    """
    with transaction.atomic():
        adjusted = Product.objects.filter(pk=product_id, stock__gte=-delta).update(
            stock=F("stock") + delta
        )
        # Our UPDATE holds the row lock until COMMIT: this reads our own result.
        stock: int = Product.objects.values_list("stock", flat=True).get(pk=product_id)
    if not adjusted:
        raise StockWouldGoNegative(product_id=product_id, delta=delta, stock=stock)
    return stock
