"""The shopping cart: {sku: quantity} in the session (a signed cookie, no table)."""

from dataclasses import dataclass
from decimal import Decimal

from django.http import HttpRequest

from shop.models import Product

SESSION_KEY = "cart"


def cart_items(request: HttpRequest) -> dict[str, int]:
    raw = request.session.get(SESSION_KEY, {})
    return {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def cart_set(request: HttpRequest, *, sku: str, quantity: int) -> None:
    items = cart_items(request)
    if quantity > 0:
        items[sku] = quantity
    else:
        items.pop(sku, None)
    request.session[SESSION_KEY] = items


def cart_clear(request: HttpRequest) -> None:
    request.session.pop(SESSION_KEY, None)


@dataclass(frozen=True)
class CartLine:
    product: Product
    quantity: int

    @property
    def subtotal(self) -> Decimal:
        return self.product.price * self.quantity


def cart_lines(request: HttpRequest) -> tuple[list[CartLine], Decimal]:
    """The cart's lines at today's prices, and their total; unknown skus are dropped."""
    items = cart_items(request)
    products = {p.sku: p for p in Product.objects.filter(sku__in=items)}
    lines = [CartLine(products[sku], qty) for sku, qty in items.items() if sku in products]
    return lines, sum((line.subtotal for line in lines), Decimal("0"))
