"""The roads out of a failed charge or receipt: an operator discards a dead letter or
cancels an order, or the payment deadline passes. Against the real gateway process and
PostgreSQL: each ends the order for good, releases its stock once, and nothing automatic
(the reconciler, a late charge attempt) undoes it."""

import uuid
from datetime import timedelta

import httpx
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.utils import timezone

from jobs.dead_letters import dead_letter_discard
from jobs.models import DeadLetter, OutboxMessage
from jobs.reconcile import reconciler
from jobs.testing import assert_enqueued, assert_nothing_enqueued, enqueued
from shop import reconcile as shop_reconcile
from shop.gateway import client as gateway_client
from shop.models import Order, Payment, Product, Receipt
from shop.services.checkout import checkout_complete, checkout_parse
from shop.services.orders import Cancelled, order_cancel
from shop.services.payments import payment_charge
from tests.helpers import run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)

CHARGE, RECEIPT = "shop.tasks.payments.charge_payment", "shop.tasks.emails.send_receipt"
AN_HOUR_AGO = timezone.now() - timedelta(hours=1)  # the reconciler looks (10 min)
DAYS_AGO = timezone.now() - timedelta(days=2)  # ... and the deadline has passed (24 h)


def place_order(quantity: int = 3) -> Payment:
    request = checkout_parse(
        {
            "email": "ada@example.com",
            "card_token": "tok_visa",
            "items": [{"sku": "MUG", "quantity": quantity}],
        }
    )
    return checkout_complete(request=request).order.payment


def dead_letter(task_name: str, arg: int) -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=str(uuid.uuid4()), task_name=task_name, args=[arg], reason="retries_exhausted"
    )


def age(payment: Payment, when: object = AN_HOUR_AGO) -> None:
    """Make the order old enough for the reconciler to look at it."""
    Order.objects.filter(pk=payment.order_id).update(created_at=when, updated_at=when)
    Payment.objects.filter(pk=payment.pk).update(updated_at=when)


def charge_behind_the_shops_back(payment: Payment) -> dict:
    """The gateway charged this key, but the shop never heard the answer."""
    response = httpx.post(
        f"{gateway_client.settings.PAYMENT_GATEWAY_URL}/v1/charges",
        headers={"Idempotency-Key": str(payment.idempotency_key)},
        json={"amount": str(payment.amount), "currency": "EUR", "source": payment.card_token},
    )
    assert response.status_code == 201, response.text
    return response.json()


def stock() -> int:
    return Product.objects.get(sku="MUG").stock


def charges_queued() -> int:
    return len(enqueued(CHARGE))


def test_discarding_a_charges_dead_letter_cancels_the_order_and_nothing_charges_it_later(
    broker, gateway, products
):
    # given a charge that ran out of retries, reserved stock, and an old order
    payment = place_order()
    letter = dead_letter(CHARGE, payment.pk)
    age(payment)
    assert stock() == 7

    # when an operator discards it, and the reconciler runs afterwards
    result = dead_letter_discard(ids=[letter.pk], actor="alice")
    queued_before = charges_queued()
    reconciler.run(repair=True)

    # then the order is over: cancelled, stock back, nothing re-enqueued or charged
    assert (result.done, result.errors) == (1, ())
    payment.refresh_from_db()
    assert (payment.status, payment.order.status) == ("cancelled", "cancelled")
    assert "cancelled" in payment.failure_message
    assert stock() == 10
    assert charges_queued() == queued_before
    assert DeadLetter.objects.get().status == "discarded"
    # and a late attempt (a message still in a queue) cannot charge it either
    payment_charge(payment_id=payment.pk)
    assert gateway.ledger(str(payment.idempotency_key)) == []
    assert stock() == 10


def test_discarding_when_the_gateway_charged_after_all_makes_the_order_paid(
    broker, gateway, products
):
    payment = place_order()
    letter = dead_letter(CHARGE, payment.pk)
    charge = charge_behind_the_shops_back(payment)

    dead_letter_discard(ids=[letter.pk], actor="alice")

    payment.refresh_from_db()
    assert (payment.status, payment.gateway_charge_id) == ("charged", charge["id"])
    assert payment.order.status == "paid"
    assert stock() == 7  # sold, not released
    assert_enqueued(RECEIPT, args=[payment.order_id])


def test_a_discard_asks_the_gateway_with_no_transaction_open(
    broker, gateway, products, monkeypatch
):
    # An open transaction (and the dead letter's row lock) would wait on the network for
    # as long as the gateway takes, up to its read timeout.
    payment = place_order()
    letter = dead_letter(CHARGE, payment.pk)
    open_during: list[bool] = []

    def watched(function):
        def call(**kwargs):
            open_during.append(connection.in_atomic_block)
            return function(**kwargs)

        return call

    monkeypatch.setattr(gateway_client, "charge_cancel", watched(gateway_client.charge_cancel))
    monkeypatch.setattr(gateway_client, "charge_find", watched(gateway_client.charge_find))

    assert dead_letter_discard(ids=[letter.pk], actor="alice").done == 1

    assert open_during == [False, False]  # two calls: cancel, then find by reference
    letter.refresh_from_db()
    payment.refresh_from_db()
    assert (letter.status, payment.status) == ("discarded", "cancelled")


def test_a_discard_the_gateway_cannot_confirm_is_refused_and_changes_nothing(
    broker, gateway, products
):
    payment = place_order()
    letter = dead_letter(CHARGE, payment.pk)
    gateway.control(outage=True)

    result = dead_letter_discard(ids=[letter.pk], actor="alice")

    assert result.done == 0
    assert result.errors == (
        f"Dead letter {letter.pk} was not discarded: the payment gateway did not answer; "
        "it is still dead, "
        "try again (that is safe to repeat).",
    )
    letter.refresh_from_db()
    assert (letter.status, letter.handled_by) == ("dead", "")
    payment.refresh_from_db()
    assert (payment.status, payment.order.status) == ("pending", "pending")
    assert stock() == 7


def test_discarding_a_receipts_dead_letter_abandons_it_and_the_reconciler_never_resends(
    broker, gateway, products
):
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    letter = dead_letter(RECEIPT, payment.order_id)
    Order.objects.filter(pk=payment.order_id).update(updated_at=AN_HOUR_AGO)
    receipts_before = len(enqueued(RECEIPT))

    dead_letter_discard(ids=[letter.pk], actor="alice")
    reconciler.run(repair=True)

    assert Receipt.objects.get(order_id=payment.order_id).status == "abandoned"
    assert len(enqueued(RECEIPT)) == receipts_before


def test_a_cancelled_key_refuses_a_charge_and_the_attempt_finishes_the_cancellation(
    broker, gateway, products
):
    # The process that cancelled at the gateway died before writing it down.
    payment = place_order()
    assert gateway_client.charge_cancel(idempotency_key=str(payment.idempotency_key)) is None

    payment_charge(payment_id=payment.pk)

    payment.refresh_from_db()
    assert (payment.status, payment.order.status) == ("cancelled", "cancelled")
    assert stock() == 10
    assert gateway.ledger(str(payment.idempotency_key)) == []


def test_cancelling_twice_at_once_releases_the_stock_once(broker, gateway, products):
    payment = place_order()

    outcomes: list[Cancelled] = []
    errors = run_concurrently(
        lambda: outcomes.append(
            order_cancel(order_id=payment.order_id, actor="ops", message="Cancelled.")
        )
    )
    again = order_cancel(order_id=payment.order_id, actor="ops", message="Cancelled.")

    assert errors == []
    assert sorted(outcomes) == ["already_final", "cancelled"]
    assert again == Cancelled.ALREADY_FINAL
    assert stock() == 10


def test_the_deadline_cancels_unpaid_orders_after_asking_the_gateway(
    broker, gateway, products, settings
):
    settings.ORDER_PAYMENT_DEADLINE = 24 * 3600
    # one order nobody decided on (its charge is dead), one the gateway did charge,
    # one still young
    forgotten = place_order(quantity=1)
    forgotten_letter = dead_letter(CHARGE, forgotten.pk)
    charged = place_order(quantity=2)
    charge_behind_the_shops_back(charged)
    young = place_order(quantity=3)
    age(forgotten, DAYS_AGO)
    age(charged, DAYS_AGO)
    age(young)  # an hour old: still inside its deadline
    assert stock() == 4

    reconciler.run(repair=True)

    assert Order.objects.get(pk=forgotten.order_id).status == "cancelled"
    assert Order.objects.get(pk=charged.order_id).status == "paid"
    assert Order.objects.get(pk=young.order_id).status == "pending"
    assert stock() == 5  # the cancelled order's one unit is back
    forgotten_letter.refresh_from_db()
    assert (forgotten_letter.status, forgotten_letter.handled_by) == (
        "discarded",
        "payment deadline",
    )
    assert gateway.ledger(str(forgotten.idempotency_key)) == []
    finding = reconciler.run(repair=True)
    deadline = next(f for f in finding if f.check_name == "unpaid_past_deadline")
    assert deadline.found == 0  # the next run finds nothing left to do


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    wanted = ["view_order", *codenames]
    user.user_permissions.set(Permission.objects.filter(codename__in=wanted))
    return user


def test_an_operator_cancels_from_the_admin_only_with_the_permission(
    client, broker, gateway, products
):
    payment = place_order()
    letter = dead_letter(CHARGE, payment.pk)
    action = {"action": "cancel_selected", "_selected_action": [payment.order_id]}

    client.force_login(staff("viewer"))
    refused = client.post("/admin/shop/order/", action)
    client.force_login(staff("ops", "cancel_order"))
    page = client.get("/admin/shop/order/").content.decode()
    done = client.post("/admin/shop/order/", action, follow=True)

    assert refused.status_code == 403
    assert "Cancel selected unpaid orders" in page
    assert done.status_code == 200
    assert "1 order cancelled, its stock released." in done.content.decode()
    payment.refresh_from_db()
    assert payment.order.status == "cancelled"
    assert stock() == 10
    letter.refresh_from_db()  # the order is over, and so is its charge's dead letter
    assert (letter.status, letter.handled_by) == ("discarded", "ops")


def cancel_from_admin(client, order_id: int):
    client.force_login(staff("ops", "cancel_order"))
    return client.post(
        "/admin/shop/order/",
        {"action": "cancel_selected", "_selected_action": [order_id]},
        follow=True,
    )


def test_an_operator_cancels_while_a_backlog_holds_every_turn_at_the_gateway(
    client, broker, gateway, products, settings
):
    """The tasks' backlog has booked every turn the shared limit gives out; the
    operator's cancel (which asks the gateway first) goes in the current second anyway."""
    from jobs.dependencies import Deferred

    settings.JOBS_DEPENDENCIES = {"gateway": {"rate": 5}}
    settings.JOBS_DEPENDENCY_MAX_WAIT = 0.05
    settings.JOBS_RETRY_BACKOFF_CAP = 1.0  # the horizon: five turns
    payment = place_order()
    while True:
        try:
            gateway_client.GATEWAY.admit()
        except Deferred as exc:
            if exc.slot is None:  # every turn up to the horizon is booked
                break

    done = cancel_from_admin(client, payment.order_id)

    assert "1 order cancelled, its stock released." in done.content.decode()
    assert Order.objects.get().status == "cancelled"


def test_the_admin_says_when_the_gateway_cannot_be_asked(client, broker, gateway, products):
    payment = place_order()
    gateway.control(outage=True)

    done = cancel_from_admin(client, payment.order_id)

    assert "the payment gateway did not answer" in done.content.decode()
    assert Order.objects.get().status == "pending"
    assert stock() == 7


def test_the_admin_says_why_it_did_not_ask_the_gateway_while_its_breaker_is_open(
    client, broker, gateway, products, settings
):
    settings.JOBS_DEPENDENCIES = {"gateway": {"failures": 1, "cooldown": 60}}
    payment = place_order()
    gateway_client.GATEWAY.failed()  # the breaker opens

    done = cancel_from_admin(client, payment.order_id)

    assert (
        "1 order was not cancelled: the gateway is not called for now (its circuit breaker "
        "is open after failures; about"
    ) in done.content.decode()
    assert Order.objects.get().status == "pending"


def test_the_deadline_counts_from_an_operators_replay_and_one_bad_order_stops_no_other(
    broker, gateway, products, settings, monkeypatch
):
    settings.ORDER_PAYMENT_DEADLINE = 24 * 3600
    replayed, broken, plain = place_order(1), place_order(1), place_order(1)
    for payment in (replayed, broken, plain):
        age(payment, DAYS_AGO)
    # an operator replayed the first one's charge an hour ago: a decision to try again
    letter = dead_letter(CHARGE, replayed.pk)
    DeadLetter.objects.filter(pk=letter.pk).update(status="replayed", handled_at=AN_HOUR_AGO)
    # the gateway refuses to say anything about the second one
    real_cancel = gateway_client.charge_cancel

    def cancel(*, idempotency_key: str) -> object:
        if idempotency_key == str(broken.idempotency_key):
            raise gateway_client.GatewayRejected("400: no such payment")
        return real_cancel(idempotency_key=idempotency_key)

    monkeypatch.setattr(gateway_client, "charge_cancel", cancel)

    reconciler.run(repair=True)

    statuses = dict(Order.objects.values_list("pk", "status"))
    assert statuses[replayed.order_id] == "pending"  # its deadline starts again
    assert statuses[broken.order_id] == "pending"
    assert statuses[plain.order_id] == "cancelled"  # not held up by the broken one
    finding = next(
        f for f in reconciler.run(repair=False) if f.check_name == "unpaid_past_deadline"
    )
    assert finding.found == 1  # the broken one, still waiting


def test_the_deadline_leaves_what_its_time_budget_cannot_reach_to_the_next_run(
    broker, gateway, products, settings, monkeypatch
):
    settings.ORDER_PAYMENT_DEADLINE = 24 * 3600
    for payment in (place_order(1), place_order(1)):
        age(payment, DAYS_AGO)
    monkeypatch.setattr(shop_reconcile, "DEADLINE_RUN_BUDGET", -1)  # a gateway that slow

    findings = {f.check_name: f for f in reconciler.run(repair=True)}

    deadline = findings["unpaid_past_deadline"]
    assert (deadline.found, deadline.repaired, deadline.error) == (2, 0, "")
    assert "2 more left for the next run (time budget)" in deadline.samples
    assert set(Order.objects.values_list("status", flat=True)) == {"pending"}


def test_each_overdue_order_is_tried_whatever_the_ones_before_it_did(
    broker, products, settings, monkeypatch, caplog
):
    settings.ORDER_PAYMENT_DEADLINE = 24 * 3600
    for _ in range(5):
        age(place_order(1), DAYS_AGO)
    # in the order they are tried: the gateway does not answer, a bug, cancelled twice,
    # and one already settled meanwhile
    outcomes: list[object] = [
        gateway_client.GatewayUnavailable("503"),
        RuntimeError("a bug"),
        Cancelled.CANCELLED,
        Cancelled.CANCELLED,
        Cancelled.ALREADY_FINAL,
    ]
    tried = []

    def cancel(*, order_id: int, **_: object) -> Cancelled:
        tried.append(order_id)
        outcome = outcomes[len(tried) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome  # type: ignore[return-value]

    monkeypatch.setattr(shop_reconcile, "order_cancel", cancel)

    findings = {f.check_name: f for f in reconciler.run(repair=True)}

    deadline = findings["unpaid_past_deadline"]
    assert len(tried) == 5  # none held up by the ones before it
    assert (deadline.found, deadline.repaired, deadline.error) == (5, 2, "")  # not the settled
    assert f"order {tried[0]}: not cancelled yet, the gateway did not answer" in deadline.samples
    assert f"order {tried[1]}: not cancelled yet, an error was logged" in deadline.samples
    assert f"reconcile: order {tried[1]} could not be cancelled" in caplog.messages


def test_a_deadline_run_that_could_cancel_no_order_is_a_check_that_could_not_run(
    broker, products, settings, monkeypatch
):
    settings.ORDER_PAYMENT_DEADLINE = 24 * 3600
    for _ in range(2):
        age(place_order(1), DAYS_AGO)
    outcomes = [gateway_client.GatewayUnavailable("503"), RuntimeError("a bug")]

    def cancel(**_: object) -> Cancelled:
        raise outcomes.pop(0)

    monkeypatch.setattr(shop_reconcile, "order_cancel", cancel)

    findings = {f.check_name: f for f in reconciler.run(repair=True)}

    error = findings["unpaid_past_deadline"].error
    assert error == "TransientError: no overdue order could be cancelled (2 waiting)"


def test_a_deadline_run_out_of_time_says_so_instead_of_going_on(
    broker, gateway, products, settings, monkeypatch
):
    settings.ORDER_PAYMENT_DEADLINE = 24 * 3600
    for payment in (place_order(1), place_order(1)):
        age(payment, DAYS_AGO)
    calls = []

    def out_of_time(**kwargs: object) -> None:
        calls.append(kwargs)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(shop_reconcile, "order_cancel", out_of_time)

    findings = {f.check_name: f for f in reconciler.run(repair=True)}

    assert len(calls) == 1  # the second order is not tried on borrowed time
    assert findings["unpaid_past_deadline"].error.startswith("SoftTimeLimitExceeded")
    assert findings["ledger_mismatch"].error == ""  # ran before it


def test_an_attempt_still_retrying_is_not_stuck_for_the_reconciler(broker, gateway, products):
    # given: an old order whose charge an operator replayed; the gateway still fails
    payment = place_order()
    age(payment, DAYS_AGO)
    Payment.objects.filter(pk=payment.pk).update(status="unknown", updated_at=DAYS_AGO)
    gateway.control(outage=True)

    with pytest.raises(gateway_client.GatewayUnavailable):
        payment_charge(payment_id=payment.pk)  # the replayed copy's attempt: it will retry
    OutboxMessage.objects.all().delete()
    [stuck] = [f for f in reconciler.run(repair=True) if f.check_name == "payment_stuck"]

    assert (stuck.found, stuck.repaired) == (0, 0)  # no second copy beside the retrying one
    assert_nothing_enqueued()


def test_discarding_one_dead_letter_of_a_charge_closes_its_others(broker, gateway, products):
    payment = place_order()
    first, again = dead_letter(CHARGE, payment.pk), dead_letter(CHARGE, payment.pk)

    result = dead_letter_discard(ids=[first.pk], actor="alice")

    assert result.done == 1
    statuses = dict(DeadLetter.objects.values_list("pk", "status"))
    assert statuses == {first.pk: "discarded", again.pk: "discarded"}
    assert Order.objects.get().status == "cancelled"
