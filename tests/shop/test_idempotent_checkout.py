"""A retried checkout (the response was lost, the web process died after COMMIT, a double
click) finds the order the first request placed: one order, one payment, one charge job,
stock reserved once. The key is the client's Idempotency-Key header, or the checkout
form's hidden token."""

import re

import pytest
from django.test import Client

from jobs.testing import enqueued
from shop.models import Order, Payment, Product
from tests.helpers import assert_nothing_written, order_body, run_concurrently


def form_token(page: str) -> str:
    match = re.search(r'name="idempotency_key" value="([^"]+)"', page)
    assert match is not None
    return match[1]


def post_order(client: Client, key: str | None, body: dict | None = None):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(
        "/api/orders/", body or order_body(), content_type="application/json", headers=headers
    )


def assert_one_order_placed() -> None:
    assert Order.objects.count() == 1
    assert Payment.objects.count() == 1
    assert len(enqueued()) == 1
    assert dict(Product.objects.values_list("sku", "stock")) == {"MUG": 8, "TEE": 9}


@pytest.mark.django_db(transaction=True)
def test_a_retried_api_checkout_returns_the_first_order(client, broker, products):
    first = post_order(client, "order-7f3a")
    again = post_order(client, "order-7f3a")

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again["Location"] == first["Location"]
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert_one_order_placed()
    assert broker.queue_lengths()["payments"] == 1


@pytest.mark.django_db(transaction=True)
def test_without_a_key_every_request_is_a_new_order(client, broker, products):
    post_order(client, None)
    post_order(client, None)

    assert Order.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_with_one_key_place_one_order(broker, products):
    responses = []

    def place() -> None:
        responses.append(post_order(Client(), "same-key"))

    errors = run_concurrently(place, times=4)

    assert errors == []
    assert [r.status_code for r in responses] == [201] * 4
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.has_header("Idempotent-Replayed") for r in responses) == 3
    assert_one_order_placed()


# One difference is enough: the email, the card, or the lines.
DIFFERENT_ORDERS = {
    "email": order_body(email="someone.else@example.com"),
    "card": order_body(card_token="tok_chargeDeclined"),
    "lines": order_body(items=[{"sku": "MUG", "quantity": 3}, {"sku": "TEE", "quantity": 1}]),
}


@pytest.mark.parametrize("different", DIFFERENT_ORDERS)
@pytest.mark.django_db(transaction=True)
def test_a_key_reused_for_a_different_order_is_a_409(client, broker, products, different):
    post_order(client, "key-1")
    stock_after_first = dict(Product.objects.values_list("sku", "stock"))

    response = post_order(client, "key-1", DIFFERENT_ORDERS[different])

    assert response.status_code == 409
    assert response.json() == {
        "errors": {"idempotency_key": ["This Idempotency-Key was used for a different order."]}
    }
    assert Order.objects.count() == 1
    assert dict(Product.objects.values_list("sku", "stock")) == stock_after_first


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\there", "ключ"])
@pytest.mark.django_db(transaction=True)
def test_a_malformed_key_is_a_400_and_writes_nothing(client, broker, products, key):
    stock_before = dict(Product.objects.values_list("sku", "stock"))

    response = post_order(client, key)

    assert response.status_code == 400
    assert "Idempotency-Key must be" in response.json()["errors"]["idempotency_key"][0]
    assert_nothing_written(broker, stock_before)


@pytest.mark.django_db(transaction=True)
def test_submitting_the_checkout_form_twice_lands_on_the_first_order(client, broker, products):
    client.post("/cart/update/", {"sku": "MUG", "quantity": "2", "mode": "add"})
    client.post("/cart/update/", {"sku": "TEE", "quantity": "1", "mode": "add"})
    token = form_token(client.get("/checkout/").text)
    form = {"email": "ada@example.com", "card_token": "tok_visa", "idempotency_key": token}

    first = client.post("/checkout/", form)
    again = client.post("/checkout/", form)  # the cart is empty now: only the token can tell

    order = Order.objects.get()
    assert first.status_code == again.status_code == 302
    assert first["Location"] == again["Location"] == f"/orders/{order.reference}/"
    assert_one_order_placed()


@pytest.mark.django_db(transaction=True)
def test_a_form_opened_before_many_others_still_lands_on_its_first_order(client, broker, products):
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})
    token = form_token(client.get("/checkout/").text)
    for _ in range(8):  # more checkout pages opened since (other tabs, reloads)
        client.get("/checkout/")
    form = {"email": "ada@example.com", "card_token": "tok_visa", "idempotency_key": token}

    first = client.post("/checkout/", form)
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})  # cart again
    again = client.post("/checkout/", form)  # back and submit the old page once more

    assert first["Location"] == again["Location"]
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_every_checkout_page_carries_a_fresh_token(client, products):
    client.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})

    tokens = {form_token(client.get("/checkout/").text) for _ in range(3)}

    assert len(tokens) == 3


@pytest.mark.django_db(transaction=True)
def test_a_malformed_key_and_a_bad_body_are_reported_together(client, broker, products):
    response = post_order(client, "bad key", order_body(email="nope"))

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"idempotency_key", "email"}
    assert Order.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_token_replays_only_for_the_session_it_was_given_to(broker, products):
    # given: a customer placed an order through the form, another one through the API
    # with a guessable key
    victim = Client()
    victim.post("/cart/update/", {"sku": "MUG", "quantity": "1", "mode": "add"})
    token = form_token(victim.get("/checkout/").text)
    placed = victim.post(
        "/checkout/",
        {"email": "ada@example.com", "card_token": "tok_visa"} | {"idempotency_key": token},
    )
    post_order(victim, "order-1")
    theirs = {str(reference) for reference in Order.objects.values_list("reference", flat=True)}

    # when: someone else posts those keys with a cart of their own
    attacker = Client()
    answers = []
    for key in (token, "order-1"):
        attacker.post("/cart/update/", {"sku": "TEE", "quantity": "1", "mode": "add"})
        answers.append(
            attacker.post(
                "/checkout/",
                {"email": "eve@example.com", "card_token": "tok_visa", "idempotency_key": key},
            )
        )

    # then: they got orders of their own, never a look at the other customer's
    assert placed.status_code == 302
    for answer in answers:
        assert answer.status_code == 302
        assert answer["Location"].split("/")[2] not in theirs
    assert Order.objects.filter(email="eve@example.com").count() == 2
