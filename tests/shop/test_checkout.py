"""Checkout writes one order, one payment and one outbox row, and publishes only after
COMMIT; bad input gets a clear 4xx and writes nothing."""

import importlib
import json
import re
import uuid

import pytest
from django.apps import apps
from django.db import transaction

from jobs import outbox
from jobs.models import OutboxMessage
from jobs.testing import assert_enqueued, enqueued
from shop.models import Order, Payment, Product
from shop.services.checkout import (
    CheckoutError,
    checkout_complete,
    checkout_parse,
    idempotency_key_parse,
)
from tests.helpers import TOKEN, assert_nothing_written, order_body


@pytest.mark.django_db(transaction=True)
def test_api_checkout_writes_one_order_payment_and_outbox_row(client, broker, products):
    response = client.post("/api/orders/", order_body(), content_type="application/json")

    assert response.status_code == 201
    body = response.json()
    order = Order.objects.get()
    url = f"/api/orders/{order.reference}/"
    assert body == {"id": str(order.reference), "status": "pending", "url": url}
    assert response["Location"] == body["url"]
    assert order.total == 2 * products["MUG"].price + products["TEE"].price
    payment = Payment.objects.get()
    assert (payment.order_id, payment.amount, payment.status) == (order.pk, order.total, "pending")
    assert_enqueued("shop.tasks.payments.charge_payment", args=[payment.pk])
    assert len(enqueued()) == 1
    assert broker.queue_lengths() == {"payments": 1, "emails": 0, "reports": 0, "default": 0}
    assert dict(Product.objects.values_list("sku", "stock")) == {"MUG": 8, "TEE": 9}


@pytest.mark.django_db(transaction=True)
def test_html_checkout_writes_one_order_and_shows_its_page(client, broker, products):
    client.post("/cart/update/", {"sku": "MUG", "quantity": "2", "mode": "add"})
    client.post("/cart/update/", {"sku": "TEE", "quantity": "1", "mode": "add"})

    form = {"email": "ada@example.com", "card_token": TOKEN}
    response = client.post("/checkout/", form)

    order = Order.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/orders/{order.reference}/"
    assert order.lines.count() == 2
    assert Payment.objects.filter(order=order).count() == 1
    assert broker.queue_lengths()["payments"] == 1
    page = client.get(response["Location"])
    assert page.status_code == 200
    assert b"Payment pending" in page.content
    assert client.get("/cart/").context["lines"] == []  # the cart was emptied


@pytest.mark.django_db(transaction=True)
def test_nothing_is_published_before_commit(broker, products):
    request = checkout_parse(order_body())

    with transaction.atomic():
        checkout_complete(request=request)
        assert OutboxMessage.objects.get().sent_at is None
        assert broker.queue_lengths()["payments"] == 0

    assert outbox.wait_published()
    assert broker.queue_lengths()["payments"] == 1
    outbox.flush_marks()
    assert OutboxMessage.objects.get().sent_at is not None


@pytest.mark.django_db(transaction=True)
def test_rolled_back_checkout_publishes_nothing(broker, products):
    request = checkout_parse(order_body())
    stock_before = dict(Product.objects.values_list("sku", "stock"))

    def checkout_then_fail() -> None:
        with transaction.atomic():
            checkout_complete(request=request)
            raise RuntimeError("something later in the transaction failed")

    with pytest.raises(RuntimeError):
        checkout_then_fail()

    assert_nothing_written(broker, stock_before)


BAD_BODIES = [
    ("unknown sku", order_body(items=[{"sku": "NOPE", "quantity": 1}]), "Unknown product"),
    ("zero quantity", order_body(items=[{"sku": "MUG", "quantity": 0}]), "between 1 and 99"),
    ("negative quantity", order_body(items=[{"sku": "MUG", "quantity": -3}]), "between 1"),
    ("huge quantity", order_body(items=[{"sku": "MUG", "quantity": 10**9}]), "between 1"),
    ("quantity as text", order_body(items=[{"sku": "MUG", "quantity": "2"}]), "whole number"),
    ("quantity as bool", order_body(items=[{"sku": "MUG", "quantity": True}]), "whole number"),
    ("more than in stock", order_body(items=[{"sku": "MUG", "quantity": 11}]), "Not enough"),
    ("no items", order_body(items=[]), "at least one item"),
    ("items not a list", order_body(items={"sku": "MUG"}), "at least one item"),
    ("item not an object", order_body(items=["MUG"]), "sku must be"),
    ("NUL byte in sku", order_body(items=[{"sku": "MU\x00G", "quantity": 1}]), "sku must be"),
    ("NUL byte in email", order_body(email="a\x00@b.co"), "valid email"),
    ("missing email", {k: v for k, v in order_body().items() if k != "email"}, "email"),
    ("invalid email", order_body(email="not-an-email"), "valid email"),
    ("no card token", {k: v for k, v in order_body().items() if k != "card_token"}, "card_token"),
    ("card token not a token", order_body(card_token="4242424242424242"), "card_token"),
    ("card token as number", order_body(card_token=4242), "card_token"),
    ("a card number", order_body(card="4242424242424242"), "never takes card numbers"),
    ("a card number and a token", order_body(card="4242 4242"), "never takes card numbers"),
    ("body not an object", ["MUG"], "JSON object"),
]


def email_of_length(length: int) -> str:
    """A valid address `length` characters long (labels of at most 63)."""
    start = f"{'a' * 64}@{'b' * 63}.{'c' * 63}."
    email = start + "d" * (length - len(start))
    assert len(email) == length
    return email


def lines(count: int, quantity: int = 1) -> list[dict[str, object]]:
    return [{"sku": f"SKU-{n}", "quantity": quantity} for n in range(count)]


# Each limit the API promises, at its maximum and one beyond (the boundary is the contract).
LIMITS = [
    ("20 lines", order_body(items=lines(20)), order_body(items=lines(21)), "items"),
    ("quantity 1 to 99", order_body(items=lines(1, 99)), order_body(items=lines(1, 100)), "items"),
    ("quantity at least 1", order_body(items=lines(1, 1)), order_body(items=lines(1, 0)), "items"),
    (
        "quantities of one sku add up",
        order_body(items=lines(1, 49) + lines(1, 50)),
        order_body(items=lines(1, 49) + lines(1, 51)),
        "items",
    ),
    (
        "email of 254 characters",
        order_body(email=email_of_length(254)),
        order_body(email=email_of_length(255)),
        "email",
    ),
    (
        "card token of 60 characters after tok_",
        order_body(card_token="tok_" + "x" * 60),
        order_body(card_token="tok_" + "x" * 61),
        "card_token",
    ),
]


@pytest.mark.parametrize(("case", "largest", "beyond", "field"), LIMITS, ids=[c[0] for c in LIMITS])
def test_each_limit_admits_its_largest_value_and_refuses_one_more(case, largest, beyond, field):
    checkout_parse(largest)

    with pytest.raises(CheckoutError) as refused:
        checkout_parse(beyond)

    assert list(refused.value.errors) == [field]


def test_each_bad_item_is_named_by_its_place_in_the_list():
    body = order_body(
        items=[{"sku": "MUG", "quantity": 1}, {"sku": "no such code!"}, {"sku": "TEE"}]
    )

    with pytest.raises(CheckoutError) as refused:
        checkout_parse(body)

    assert refused.value.errors == {
        "items": [
            "Item 2: sku must be a product code.",
            "Item 3: quantity must be a whole number.",
        ]
    }


def test_an_idempotency_key_is_1_to_255_printable_characters():
    assert idempotency_key_parse("k" * 255) == "k" * 255
    assert idempotency_key_parse("!~") == "!~"
    for bad in ("", "k" * 256, "has space", "tab\t"):
        with pytest.raises(CheckoutError):
            idempotency_key_parse(bad)


@pytest.mark.parametrize(("case", "body", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
@pytest.mark.django_db(transaction=True)
def test_api_rejects_bad_input_and_writes_nothing(client, broker, products, case, body, message):
    stock_before = dict(Product.objects.values_list("sku", "stock"))

    response = client.post("/api/orders/", body, content_type="application/json")

    assert response.status_code == 400, case
    assert message in json.dumps(response.json()["errors"])
    assert_nothing_written(broker, stock_before)


@pytest.mark.django_db(transaction=True)
def test_api_rejects_malformed_oversized_and_non_json_bodies(client, broker, products):
    stock_before = dict(Product.objects.values_list("sku", "stock"))

    malformed = client.post("/api/orders/", "{not json", content_type="application/json")
    too_big = client.post(
        "/api/orders/", json.dumps(order_body(pad="x" * 70_000)), content_type="application/json"
    )
    form = client.post("/api/orders/", {"email": "a@b.co"})
    wrong_method = client.get("/api/orders/")

    assert malformed.status_code == 400
    assert malformed.json() == {"errors": {"body": ["Malformed JSON."]}}
    assert too_big.status_code == 413
    assert "too large" in too_big.json()["errors"]["body"][0]
    assert form.status_code == 415
    assert wrong_method.status_code == 405
    assert wrong_method["Allow"] == "POST"
    assert_nothing_written(broker, stock_before)


@pytest.mark.django_db(transaction=True)
def test_checkout_form_shows_errors_and_writes_nothing(client, broker, products):
    stock_before = dict(Product.objects.values_list("sku", "stock"))
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})

    response = client.post("/checkout/", {"email": "", "card_token": ""})

    assert response.status_code == 400
    assert b"Enter an email address for the receipt." in response.content
    assert b"Enter your card number again" in response.content
    assert b'aria-invalid="true"' in response.content
    assert_nothing_written(broker, stock_before)


@pytest.mark.django_db(transaction=True)
def test_checkout_form_with_an_oversized_body_is_a_400_page(client, broker, products):
    stock_before = dict(Product.objects.values_list("sku", "stock"))
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})

    form = {"email": "a@b.co", "card_token": TOKEN, "x": "y" * 70_000}
    response = client.post("/checkout/", form)

    assert response.status_code == 400
    assert b"could not be read" in response.content
    assert_nothing_written(broker, stock_before)


@pytest.mark.django_db(transaction=True)
def test_checkout_with_an_empty_cart_writes_nothing(client, broker, products):
    stock_before = dict(Product.objects.values_list("sku", "stock"))

    response = client.post("/checkout/", {"email": "ada@example.com", "card_token": TOKEN})

    assert response.status_code == 400
    assert b"Add at least one item" in response.content
    assert_nothing_written(broker, stock_before)


@pytest.mark.django_db
def test_cart_rejects_unknown_products_and_bad_quantities(client, products):
    unknown = client.post("/cart/update/", {"sku": "NOPE", "quantity": "1"}, follow=True)
    bad = client.post("/cart/update/", {"sku": "MUG", "quantity": "lots"}, follow=True)

    assert b"Choose a product and a quantity" in unknown.content
    assert b"Choose a product and a quantity" in bad.content
    assert client.get("/cart/").context["lines"] == []


@pytest.mark.django_db
def test_order_status_api(client, products):
    order = checkout_complete(request=checkout_parse(order_body())).order

    response = client.get(f"/api/orders/{order.reference}/")
    unknown = uuid.uuid4()
    missing = client.get(f"/api/orders/{unknown}/")

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["number"], body["status"]) == (
        str(order.reference),
        order.pk,
        "pending",
    )
    assert body["payment"]["status"] == "pending"
    assert body["receipt"]["status"] == "pending"
    assert missing.status_code == 404
    assert missing.json() == {"errors": {"order": [f"No order with id {unknown}."]}}
    assert client.get(f"/orders/{unknown}/").status_code == 404
    # the sequential number is not a way in: only the unguessable reference is
    assert client.get(f"/api/orders/{order.pk}/").status_code == 404
    assert client.get(f"/orders/{order.pk}/").status_code == 404


@pytest.mark.django_db
def test_products_api_lists_the_catalog(client, products):
    response = client.get("/api/products/")

    assert response.status_code == 200
    assert response.json() == [
        {"sku": "MUG", "name": "Mug", "price": "12.50", "stock": 10},
        {"sku": "TEE", "name": "Tee", "price": "20.00", "stock": 10},
    ]


@pytest.mark.django_db
def test_the_checkout_page_never_posts_the_card_number_to_the_shop(client, products, settings):
    settings.PAYMENT_GATEWAY_PUBLIC_URL = "https://pay.example.com/"
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})

    page = client.get("/checkout/").text

    card = re.search(r'<input id="card"[^>]*>', page)
    assert card
    assert " name=" not in card.group(0)  # a field without a name is never sent
    assert '<input type="hidden" name="card_token"' in page
    assert 'data-tokens-url="https://pay.example.com/v1/tokens"' in page
    assert "shop/checkout.js" in page


@pytest.mark.django_db
def test_the_migration_forgets_card_numbers_stored_before_tokens(products):
    forget = importlib.import_module("shop.migrations.0007_no_card_numbers")
    old = checkout_complete(request=checkout_parse(order_body())).order.payment
    new = checkout_complete(request=checkout_parse(order_body())).order.payment
    Payment.objects.filter(pk=old.pk).update(card_token="4242424242424242")

    forget.forget_card_numbers(apps, None)

    tokens = dict(Payment.objects.values_list("pk", "card_token"))
    assert tokens == {old.pk: forget.FORGOTTEN, new.pk: TOKEN}
    assert forget.FORGOTTEN.startswith("tok_")  # the gateway answers "unknown token": declined
