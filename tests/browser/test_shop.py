"""A shopper in a real browser: browse, fill the cart, check out, and watch the order
page follow the order (paid, receipt sent) without reloading."""

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import dead_letter_count, gateway_control, screenshot
from tests.processes import wait_until

pytestmark = pytest.mark.stack


def field(page, name: str):
    """One live field of the order page's status box."""
    return page.locator(f"#order-status [data-field={name}]")


def add_to_cart(page, product: str, quantity: int = 1) -> None:
    card = page.locator("li.product", has_text=product)
    card.get_by_label("Quantity").fill(str(quantity))
    card.get_by_role("button", name="Add to cart").click()


def check_out(page, card: str) -> None:
    if not page.url.endswith("/cart/"):
        page.get_by_role("link", name=re.compile("^Cart")).click()
    page.get_by_role("link", name="Check out").click()
    page.get_by_label("Email for the receipt").fill("ada@example.com")
    page.get_by_label("Card number").fill(card)
    page.get_by_role("button", name=re.compile("Place order")).click()
    page.wait_for_url(re.compile(r"/orders/[0-9a-f-]{36}/$"))


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
    check_out(page, "4242 4242 4242 4242")
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


def place_order_the_gateway_cannot_charge(shop, page) -> str:
    """Check out while the gateway is down until the charge is a dead letter (its
    retries exhausted); the order page's address."""
    dead_before = dead_letter_count(shop)
    gateway_control(shop, outage=True)
    try:
        page.goto(f"{shop.site}/")
        add_to_cart(page, "Enamel camp mug")
        check_out(page, "4242 4242 4242 4242")
        expect(field(page, "payment")).to_have_text("Payment pending")
        wait_until(
            lambda: dead_letter_count(shop) > dead_before, timeout=90, what="the dead letter"
        )
    finally:
        gateway_control(shop, outage=False)
    return str(page.url)


def test_a_charge_that_cannot_go_through_leaves_a_clear_pending_state(shop, page):
    place_order_the_gateway_cannot_charge(shop, page)
    page.reload()
    screenshot(page, "order-payment-pending")

    expect(field(page, "payment")).to_have_text("Payment pending")
    expect(field(page, "status")).to_have_text("Payment pending")
    text = page.locator("main").inner_text()
    assert "Traceback" not in text
    assert "Order accepted" in text
