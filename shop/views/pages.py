"""HTML pages: catalog, cart, checkout, live order status. Thin: parse, call, render."""

import hashlib
import hmac
import secrets
from uuid import UUID, uuid4

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from shop import selectors
from shop.cart import cart_clear, cart_items, cart_lines, cart_set
from shop.models import Product
from shop.services.checkout import (
    MAX_QUANTITY,
    SKU,
    CheckoutConflict,
    CheckoutError,
    checkout_complete,
    checkout_parse,
)

# A random secret per session: the checkout form's tokens are keyed with it.
FORM_HMAC_FIELD = "checkout_hmac"


def _form_token(request: HttpRequest) -> str:
    """A fresh token for one checkout page."""
    request.session.setdefault(FORM_HMAC_FIELD, secrets.token_hex(16))
    return str(uuid4())


def _form_key(request: HttpRequest) -> str | None:
    """The order's idempotency key for the posted token, bound to this session.

    The key is an HMAC of the token with this session's secret, in a namespace of its
    own: posting somebody else's token (or a guessable API Idempotency-Key) finds
    nothing, so it can never show another customer's order; and any page this session
    opened, however long ago, still lands a second submit on the first order.
    """
    token = request.POST.get("idempotency_key", "")
    secret = request.session.get(FORM_HMAC_FIELD)
    if not secret or not token:
        return None
    digest = hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()
    return f"form:{digest}"


ENTER_CARD_AGAIN = (
    "Enter your card number again: it goes to the payment processor first, which needs"
    " JavaScript in this page."
)


def _checkout_page(
    request: HttpRequest, context: dict[str, object], status: int = 200
) -> HttpResponse:
    tokens_url = settings.PAYMENT_GATEWAY_PUBLIC_URL.rstrip("/") + "/v1/tokens"
    return render(
        request, "shop/checkout.html", {**context, "tokens_url": tokens_url}, status=status
    )


def _quantity(raw: str | None) -> int | None:
    try:
        value = int(raw or "")
    except ValueError:
        return None
    return value if 0 <= value <= MAX_QUANTITY else None


@require_GET
def catalog(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/catalog.html", {"products": selectors.product_list()})


@require_POST
def cart_update(request: HttpRequest) -> HttpResponse:
    sku = request.POST.get("sku", "")
    quantity = _quantity(request.POST.get("quantity"))
    product = Product.objects.filter(sku=sku).first() if SKU.fullmatch(sku) else None
    if product is None or quantity is None:
        messages.error(request, f"Choose a product and a quantity from 0 to {MAX_QUANTITY}.")
        return redirect("cart")
    if request.POST.get("mode") == "add":
        quantity = min(cart_items(request).get(sku, 0) + max(quantity, 1), MAX_QUANTITY)
        messages.success(request, f"Added {product.name} to your cart.")
    cart_set(request, sku=sku, quantity=quantity)
    return redirect("catalog" if request.POST.get("next") == "catalog" else "cart")


@require_GET
def cart(request: HttpRequest) -> HttpResponse:
    lines, total = cart_lines(request)
    return render(request, "shop/cart.html", {"lines": lines, "total": total})


@require_http_methods(["GET", "POST"])
def checkout(request: HttpRequest) -> HttpResponse:
    lines, total = cart_lines(request)
    context: dict[str, object] = {"lines": lines, "total": total, "errors": {}, "form": {}}
    if request.method == "GET":
        if not lines:
            messages.info(request, "Your cart is empty.")
            return redirect("catalog")
        return _checkout_page(request, {**context, "token": _form_token(request)})
    # No card number here: the page's script sent it to the gateway and posts its token.
    form = {"email": request.POST.get("email", ""), "card_token": request.POST.get("card_token")}
    items = [{"sku": sku, "quantity": qty} for sku, qty in cart_items(request).items()]
    # The form's hidden token: a second submit (double click, back and resubmit, a retry
    # after the web process died) lands on the order the first one placed.
    key = _form_key(request)
    if key and (earlier := selectors.order_for_idempotency_key(key)) is not None:
        return redirect("order-detail", reference=earlier.reference)
    try:
        order = checkout_complete(
            request=checkout_parse({**form, "items": items}), idempotency_key=key
        ).order
    except CheckoutConflict:  # the first submit won a race with this one and emptied the cart
        earlier = selectors.order_for_idempotency_key(key or "")
        if earlier is None:
            raise
        return redirect("order-detail", reference=earlier.reference)
    except CheckoutError as exc:
        # A flat list for the summary: in a template, errors.items would look up the key
        # "items" before the dict method.
        errors = dict(exc.errors)
        if errors.pop("card_token", None):  # what the API says about tokens means little here
            errors["card"] = [ENTER_CARD_AGAIN]
        summary = [message for messages in errors.values() for message in messages]
        context.update(errors=errors, summary=summary, form=form, token=_form_token(request))
        return _checkout_page(request, context, status=400)
    cart_clear(request)
    return redirect("order-detail", reference=order.reference)


@require_GET
def order_detail(request: HttpRequest, reference: UUID) -> HttpResponse:
    order = selectors.order_get(reference=reference)
    if order is None:
        raise Http404("No such order.")
    return render(
        request, "shop/order.html", {"order": order, "status": selectors.order_status(order)}
    )
