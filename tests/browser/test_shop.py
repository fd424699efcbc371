"""A shopper in a real browser: browse, fill the cart, check out, and watch the order
page follow the order (paid, receipt sent) without reloading."""

import re

import pytest
from playwright.sync_api import expect

from tests.helpers import (
    add_to_cart,
    check_out,
    field,
    fill_checkout,
    gateway_control,
    place_order_the_gateway_cannot_charge,
    screenshot,
)

pytestmark = pytest.mark.stack
COUNT_ORDERS = "from shop.models import Order; print(Order.objects.count())"


def test_every_field_a_shopper_fills_has_a_label(shop, page):
    page.goto(f"{shop.site}/")
    add_to_cart(page, "Canvas tote bag")
    page.get_by_role("link", name=re.compile("^Cart")).click()
    page.get_by_role("link", name="Check out").click()

    for path in ("/", "/cart/", "/checkout/"):
        page.goto(f"{shop.site}{path}")
        fields = page.locator("main input:not([type=hidden]), main select, main textarea")
        assert fields.count() > 0, path
        for index in range(fields.count()):
            field_id = fields.nth(index).get_attribute("id")
            assert field_id, (path, index)
            assert page.locator(f'label[for="{field_id}"]').count() == 1, (path, field_id)


def test_a_shopper_checks_out_and_watches_the_order_get_paid_and_receipted(shop, page):
    page.goto(f"{shop.site}/")
    screenshot(page, "catalog")
    add_to_cart(page, "Enamel camp mug", 2)
    add_to_cart(page, "Canvas tote bag")
    page.get_by_role("link", name=re.compile("^Cart")).click()
    screenshot(page, "cart")
    assert page.get_by_role("cell", name="Enamel camp mug", exact=True).is_visible()
    assert page.get_by_label("Quantity of Enamel camp mug").input_value() == "2"

    mails_before = len(shop.mails())
    sent: list[tuple[str, str]] = []  # (url, body) of every request the page makes
    page.on("request", lambda request: sent.append((request.url, request.post_data or "")))
    check_out(page, "4242 4242 4242 4242")
    # The number went to the gateway only; the shop got the gateway's token.
    to_shop = [body for url, body in sent if url.startswith(shop.site)]
    to_gateway = [body for url, body in sent if url.startswith(shop.gateway)]
    assert any("4242424242424242" in body for body in to_gateway), sent
    assert not any(re.search(r"4242(\+|%20)?4242", body) for body in to_shop), to_shop
    assert any("card_token=tok_" in body for body in to_shop), to_shop
    screenshot(page, "order-pending")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    expect(field(page, "payment")).to_have_text("Paid", timeout=60_000)
    expect(field(page, "receipt")).to_have_text("Receipt sent", timeout=60_000)
    screenshot(page, "order-receipt-sent")

    assert navigations == []  # the page followed the order without reloading
    # a screen reader hears the change: the status box is a live region
    assert page.locator("#order-status").get_attribute("aria-live") == "polite"
    expect(field(page, "status")).to_have_text("Paid")
    assert len(shop.mails()) == mails_before + 1
    assert "ada@example.com" in shop.mails()[-1].read_text()


def test_a_charge_that_cannot_go_through_leaves_a_clear_pending_state(shop, page):
    place_order_the_gateway_cannot_charge(shop, page)
    page.reload()
    screenshot(page, "order-payment-pending")

    expect(field(page, "payment")).to_have_text("Payment pending")
    expect(field(page, "status")).to_have_text("Payment pending")
    text = page.locator("main").inner_text()
    assert "Traceback" not in text
    assert "Order accepted" in text


def test_a_card_the_gateway_refuses_is_explained_on_the_checkout_page(shop, page):
    orders_before = shop.manage("shell", "-c", COUNT_ORDERS)
    page.goto(f"{shop.site}/")
    add_to_cart(page, "Canvas tote bag")

    fill_checkout(page, "4242 4242 4242 4241")  # fails its check digit, at the gateway
    expect(page.locator("#card-error")).to_contain_text("check digit")
    gateway_control(shop, outage=True)
    try:
        page.get_by_role("button", name=re.compile("Place order")).click()
        expect(page.locator("#card-error")).to_contain_text("cannot be reached")
    finally:
        gateway_control(shop, outage=False)

    assert page.url.endswith("/checkout/")
    assert shop.manage("shell", "-c", COUNT_ORDERS) == orders_before  # nothing ordered
