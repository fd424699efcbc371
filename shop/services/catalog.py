"""The catalog's stock, as operators change it: by adding or removing units, never by
writing a number back. A number read earlier would erase the reservations made since."""

from uuid import UUID

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils.translation import ngettext

from shop.models import Product, StockAdjustment


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


class AdjustmentAlreadyApplied(Exception):
    """This form's adjustment was applied before (the form was sent twice): nothing changed."""


def product_stock_adjust(
    *, product_id: int, delta: int, actor: str = "", token: UUID | None = None
) -> int:
    """Add `delta` units (negative removes) to the current stock and return the new stock.

    One conditional UPDATE is both the check and the change, as a checkout's reservation
    is, so concurrent adjustments and orders all count and none can take stock below zero.
    Each adjustment is recorded (StockAdjustment) in the same transaction; a `token` (the
    form's, one per page) applies once however often it is sent. Raises
    StockWouldGoNegative or AdjustmentAlreadyApplied (nothing changed), or
    Product.DoesNotExist.
    """
    try:
        with transaction.atomic():
            adjusted = Product.objects.filter(pk=product_id, stock__gte=-delta).update(
                stock=F("stock") + delta
            )
            # Our UPDATE holds the row lock until COMMIT: this reads our own result.
            stock: int = Product.objects.values_list("stock", flat=True).get(pk=product_id)
            if adjusted:
                StockAdjustment.objects.create(
                    product_id=product_id, delta=delta, actor=actor, token=token
                )
    except IntegrityError:  # the token's unique constraint: rolled back, stock included
        raise AdjustmentAlreadyApplied(
            "This change was already made (the form was sent twice); reload the page to"
            " make another."
        ) from None
    if not adjusted:
        raise StockWouldGoNegative(product_id=product_id, delta=delta, stock=stock)
    return stock
