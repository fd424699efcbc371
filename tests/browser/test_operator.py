"""An operator in a real browser: the dead letters in the admin (filter, read the
traceback, replay, a second replay refused), an operator without the replay permission,
and the Operations page."""

import re

import pytest
from playwright.sync_api import expect

from tests.helpers import (
    create_dead_letters,
    dead_letter_count,
    field,
    log_in,
    place_order_the_gateway_cannot_charge,
    screenshot,
)

pytestmark = pytest.mark.stack

REPLAY = "Replay selected dead letters"


def select_and_run(page, action: str) -> None:
    page.locator("input[name=_selected_action]").first.check()
    page.locator("select[name=action]").select_option(label=action)
    page.get_by_role("button", name="Go").click()


def test_an_operator_replays_a_dead_letter_and_the_order_completes_once(shop, page, other_page):
    # given: a charge that ran out of retries while the gateway was down (now back)
    shopper = other_page
    order_page = place_order_the_gateway_cannot_charge(shop, shopper)

    log_in(page, shop, shop.admin_user, shop.admin_password)
    page.goto(f"{shop.site}/admin/jobs/deadletter/")
    page.get_by_role("link", name="Retries exhausted").click()
    expect(page).to_have_url(re.compile(r"reason__exact=retries_exhausted"))
    screenshot(page, "admin-dead-letters")
    page.locator("#result_list tbody tr").first.locator("a").first.click()
    expect(page.locator("main")).to_contain_text("Traceback")
    expect(page.locator("main")).to_contain_text("GatewayUnavailable")
    screenshot(page, "admin-dead-letter")
    page.go_back()

    # when: the operator replays it
    dead = dead_letter_count(shop)
    select_and_run(page, REPLAY)

    # then: confirmed, and the shopper's order page completes on its own
    expect(page.locator(".messagelist")).to_contain_text("1 dead letter replayed.")
    screenshot(page, "admin-replayed")
    assert dead_letter_count(shop) == dead - 1
    shopper.goto(order_page)
    expect(field(shopper, "payment")).to_have_text("Paid", timeout=60_000)
    expect(field(shopper, "receipt")).to_have_text("Receipt sent", timeout=60_000)

    # and a second replay of the same letter is refused, with a message
    page.reload()
    select_and_run(page, REPLAY)
    expect(page.locator(".messagelist")).to_contain_text(
        "1 was not replayed: only dead letters in state 'dead' can be."
    )


def test_an_operator_without_the_replay_permission_is_not_offered_the_action(
    shop, page, other_page
):
    create_dead_letters(shop, "permanent_error", 1)  # a list to act on
    shop.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import Permission, User; "
        "u = User.objects.create_user('viewer', password='viewer-pass-1', is_staff=True); "
        "u.user_permissions.add(Permission.objects.get(codename='view_deadletter'))",
    )
    admin = other_page
    log_in(admin, shop, shop.admin_user, shop.admin_password)
    admin.goto(f"{shop.site}/admin/jobs/deadletter/")
    assert REPLAY in admin.locator("select[name=action] option").all_inner_texts()  # offered

    log_in(page, shop, "viewer", "viewer-pass-1")
    page.goto(f"{shop.site}/admin/jobs/deadletter/")

    expect(page.locator("#result_list tbody tr").first).to_be_visible()  # the viewer sees them
    options = page.locator("select[name=action] option").all_inner_texts()
    assert REPLAY not in options
    assert not any("Discard" in option for option in options)


def test_the_operations_page_shows_queue_depths_and_dead_letters(shop, page):
    create_dead_letters(shop, "poison", 2)
    poison = dead_letter_count(shop, "poison")

    log_in(page, shop, shop.admin_user, shop.admin_password)
    page.goto(f"{shop.site}/admin/operations/")
    screenshot(page, "admin-operations")

    queues = page.locator("#queues")
    for queue in ("payments", "emails", "reports", "default"):
        expect(queues).to_contain_text(queue)
    row = page.locator("#dead-letters tbody tr", has_text="Poison message")
    expect(row.locator("td").nth(1)).to_have_text(str(poison))  # this test's two, at least
