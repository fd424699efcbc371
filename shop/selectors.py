"""Reads for pages and the API."""

from typing import Any
from uuid import UUID

from django.urls import reverse

from shop.models import Order, Product, Receipt


def product_list() -> list[Product]:
    return list(Product.objects.order_by("name"))


def order_for_idempotency_key(key: str) -> Order | None:
    return Order.objects.filter(idempotency_key=key).first()


def order_get(*, reference: UUID) -> Order | None:
    return (
        Order.objects.select_related("payment", "receipt")
        .prefetch_related("lines__product")
        .filter(reference=reference)
        .first()
    )


def order_url(order: Order) -> str:
    """The order's address in the API (no query: the status would need two)."""
    return reverse("api-order-detail", args=[order.reference])


def order_status(order: Order) -> dict[str, Any]:
    """The order's state as the API and the live order page show it."""
    payment = getattr(order, "payment", None)
    receipt: Receipt | None = getattr(order, "receipt", None)
    return {
        "id": str(order.reference),
        "number": order.pk,
        "status": order.status,
        "status_display": order.get_status_display(),
        "total": str(order.total),
        "url": order_url(order),
        "page": reverse("order-detail", args=[order.reference]),
        "created_at": order.created_at.isoformat(),
        "payment": {
            "status": payment.status if payment else None,
            "status_display": payment.get_status_display() if payment else None,
            "message": payment.failure_message if payment else "",
        },
        "receipt": {
            "status": receipt.status if receipt else Receipt.Status.PENDING,
            "sent_at": receipt.sent_at.isoformat() if receipt and receipt.sent_at else None,
        },
    }
