"""Checkout: validate an order request, then write the order and its first job atomically."""

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import F

from jobs.outbox import enqueue
from shop.models import Order, OrderLine, Payment, Product
from shop.tasks.payments import charge_payment as charge_payment_task

SKU = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")  # what a product code looks like
MAX_LINES = 20
MAX_QUANTITY = 99
MAX_EMAIL_LENGTH = 254
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
# A card as the payment gateway's token (POST /v1/tokens). The shop never takes a card
# number: the shopper's browser sends it to the gateway, which answers with a token.
CARD_TOKEN = re.compile(r"tok_[A-Za-z0-9_]{1,60}")
SEND_A_CARD_AS = (
    "Send card_token: a token from the payment gateway's POST /v1/tokens"
    " (test tokens: tok_visa charges, tok_chargeDeclined is declined)."
)
NO_CARD_NUMBERS = (
    "The shop never takes card numbers: create a token with the payment gateway's"
    " POST /v1/tokens and send it as card_token."
)


class CheckoutError(Exception):
    """Invalid order request: `errors` maps a field to messages a shopper can act on."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class CheckoutConflict(CheckoutError):
    """The idempotency key was already used for a different order request."""


@dataclass(frozen=True)
class CheckoutItem:
    sku: str
    quantity: int


@dataclass(frozen=True)
class CheckoutRequest:
    email: str
    card_token: str
    items: tuple[CheckoutItem, ...]


def _clean_email(value: Any, errors: dict[str, list[str]]) -> str:
    if not isinstance(value, str) or not value.strip():
        errors["email"] = ["Enter an email address for the receipt."]
        return ""
    email = value.strip()
    try:
        if len(email) > MAX_EMAIL_LENGTH:
            raise ValidationError("too long")
        validate_email(email)
    except ValidationError:
        errors["email"] = ["Enter a valid email address."]
    return email


def _clean_card_token(data: dict[str, Any], errors: dict[str, list[str]]) -> str:
    if "card" in data:  # refused even when a token comes too: a number must never be sent
        errors["card"] = [NO_CARD_NUMBERS]
        return ""
    token = data.get("card_token")
    if not isinstance(token, str) or not CARD_TOKEN.fullmatch(token):
        errors["card_token"] = [SEND_A_CARD_AS]
        return ""
    return token


def _clean_items(value: Any, errors: dict[str, list[str]]) -> tuple[CheckoutItem, ...]:
    if not isinstance(value, list) or not value:
        errors["items"] = ["Add at least one item: a list of {sku, quantity}."]
        return ()
    if len(value) > MAX_LINES:
        errors["items"] = [f"At most {MAX_LINES} different products per order."]
        return ()
    quantities: dict[str, int] = {}
    messages: list[str] = []
    for index, item in enumerate(value):
        sku = item.get("sku") if isinstance(item, dict) else None
        quantity = item.get("quantity") if isinstance(item, dict) else None
        if not isinstance(sku, str) or not SKU.fullmatch(sku):
            # Checked by shape before any query: a NUL byte would reach PostgreSQL.
            messages.append(f"Item {index + 1}: sku must be a product code.")
        elif isinstance(quantity, bool) or not isinstance(quantity, int):
            messages.append(f"Item {index + 1}: quantity must be a whole number.")
        else:
            quantities[sku] = quantities.get(sku, 0) + quantity
    for sku, quantity in quantities.items():
        if not 1 <= quantity <= MAX_QUANTITY:
            messages.append(f"{sku}: quantity must be between 1 and {MAX_QUANTITY}.")
    if messages:
        errors["items"] = messages
    return tuple(CheckoutItem(sku, quantity) for sku, quantity in quantities.items())


def checkout_parse(data: Any) -> CheckoutRequest:
    """Validate the shape of an order request (JSON body or form). Raises CheckoutError."""
    if not isinstance(data, dict):
        raise CheckoutError({"body": ["Send a JSON object with email, card_token and items."]})
    errors: dict[str, list[str]] = {}
    email = _clean_email(data.get("email"), errors)
    card_token = _clean_card_token(data, errors)
    items = _clean_items(data.get("items"), errors)
    if errors:
        raise CheckoutError(errors)
    return CheckoutRequest(email=email, card_token=card_token, items=items)


@dataclass(frozen=True)
class Placed:
    order: Order
    replayed: bool  # True: the idempotency key found an order placed earlier


def idempotency_key_parse(value: str | None) -> str | None:
    """The client's key, None when absent. Raises CheckoutError when malformed."""
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(value):
        raise CheckoutError(
            {"idempotency_key": ["Idempotency-Key must be 1-255 printable ASCII characters."]}
        )
    return value


def _same_request(order: Order, request: CheckoutRequest) -> bool:
    lines = {line.product.sku: line.quantity for line in order.lines.select_related("product")}
    return (
        order.email == request.email
        and order.payment.card_token == request.card_token
        and lines == {item.sku: item.quantity for item in request.items}
    )


def _replay(key: str, request: CheckoutRequest) -> Placed | None:
    order = Order.objects.select_related("payment").filter(idempotency_key=key).first()
    if order is None:
        return None
    if not _same_request(order, request):
        raise CheckoutConflict(
            {"idempotency_key": ["This Idempotency-Key was used for a different order."]}
        )
    return Placed(order=order, replayed=True)


def checkout_complete(*, request: CheckoutRequest, idempotency_key: str | None = None) -> Placed:
    """Reserve stock, write Order + lines + Payment, and enqueue the charge: all or nothing.

    The charge task is published only after COMMIT (through the outbox), so a worker never
    sees an order that does not exist yet, and a crash after COMMIT loses no order. With an
    idempotency key, a retry of the same request returns the order placed the first time
    (nothing is reserved, written or charged again); the same key with a different request
    raises CheckoutConflict.
    """
    try:
        order = _place(request, idempotency_key)
    except IntegrityError:
        # The key is taken: this is a retry (perhaps concurrent) of an order placed
        # before, and the unique constraint rolled ours back, stock included. Letting
        # the constraint find retries, instead of looking the key up first, saves every
        # first attempt a query.
        if idempotency_key is None or not (placed := _replay(idempotency_key, request)):
            raise
        return placed
    return Placed(order=order, replayed=False)


def _place(request: CheckoutRequest, idempotency_key: str | None) -> Order:
    skus = [item.sku for item in request.items]
    with transaction.atomic():
        products = {p.sku: p for p in Product.objects.filter(sku__in=skus)}
        unknown = [sku for sku in skus if sku not in products]
        if unknown:
            raise CheckoutError({"items": [f"Unknown product: {sku}." for sku in unknown]})
        # In a fixed order (by id), so two checkouts never deadlock on row locks.
        lines = sorted(request.items, key=lambda item: products[item.sku].pk)
        total = sum((products[i.sku].price * i.quantity for i in lines), Decimal("0"))
        order = Order.objects.create(
            email=request.email, total=total, idempotency_key=idempotency_key
        )
        OrderLine.objects.bulk_create(
            OrderLine(
                order=order,
                product=products[i.sku],
                quantity=i.quantity,
                unit_price=products[i.sku].price,
            )
            for i in lines
        )
        payment = Payment.objects.create(order=order, amount=total, card_token=request.card_token)
        enqueue(charge_payment_task, args=[payment.pk])
        # Stock is reserved last: the UPDATE locks the product rows until COMMIT, and
        # every checkout of the same product waits for that lock; taken last, it is held
        # for these statements and the COMMIT only, not through the four inserts.
        short = [
            item.sku
            for item in lines
            if not Product.objects.filter(
                pk=products[item.sku].pk, stock__gte=item.quantity
            ).update(stock=F("stock") - item.quantity)
        ]
        if short:  # raising rolls back the order, its lines, payment and outbox row
            raise CheckoutError(
                {"items": [f"Not enough {products[sku].name} in stock." for sku in short]}
            )
    return order
