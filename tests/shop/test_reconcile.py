"""The reconciler checks outcomes: it repairs a stuck order through the outbox, leaves
what an operator owns or decided alone and what is younger than its threshold to its own
task, and reports each kind of ledger mismatch without touching anything."""

import re
import uuid
from datetime import datetime, timedelta

import httpx
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.dead_letters import dead_letter_discard, dead_letter_prune
from jobs.models import DeadLetter, ReconciliationFinding
from jobs.reconcile import reconciler
from jobs.testing import assert_enqueued, assert_nothing_enqueued, enqueued
from shop import reconcile
from shop.models import Order, Payment, Receipt
from shop.reconcile import ledger_mismatch, paid_without_receipt, payment_stuck
from shop.services.payments import charge_description
from shop.services.receipts import CLAIM_LEASE, receipt_send
from tests.helpers import scrape, value

pytestmark = pytest.mark.django_db(transaction=True)

LONG_AGO = timezone.now() - timedelta(hours=1)
SEND_RECEIPT = "shop.tasks.emails.send_receipt"
CHARGE_PAYMENT = "shop.tasks.payments.charge_payment"


def paid_order(products, *, receipt: str | None = "pending") -> Order:
    order = Order.objects.create(email="ada@example.com", total="12.50", status="paid")
    Payment.objects.create(order=order, amount="12.50", card_token="tok_visa", status="charged")
    if receipt:
        Receipt.objects.create(order=order, status=receipt)
    Order.objects.filter(pk=order.pk).update(updated_at=LONG_AGO, created_at=LONG_AGO)
    return order


def unpaid_order() -> tuple[Order, Payment]:
    order = Order.objects.create(email="ada@example.com", total="12.50")
    payment = Payment.objects.create(order=order, amount="12.50", card_token="tok_visa")
    return order, payment


def age(order: Order, when: object = LONG_AGO) -> None:
    Order.objects.filter(pk=order.pk).update(created_at=when, updated_at=when)
    Payment.objects.filter(order=order).update(updated_at=when)


def charge_at_gateway(
    gateway, description: str, *, key: str | None = None, source: str = "tok_visa"
) -> httpx.Response:
    """A charge in the gateway's ledger the shop did not record (or never heard of)."""
    return httpx.post(
        f"{gateway.url}/v1/charges",
        headers={"Idempotency-Key": key or str(uuid.uuid4())},
        json={"amount": "12.50", "currency": "EUR", "source": source, "description": description},
    )


def about(order: Order, samples: list[str]) -> list[str]:
    """The samples about this order (the session's gateway ledger holds other tests')."""
    return [s for s in samples if s.startswith(f"order {order.pk}:")]


def inside_the_threshold() -> datetime:
    """A minute younger than RECONCILE_AFTER_MINUTES: its own task may still be retrying."""
    threshold = timedelta(minutes=django_settings.RECONCILE_AFTER_MINUTES)
    return timezone.now() - threshold + timedelta(minutes=1)


def finding(name: str) -> ReconciliationFinding:
    return ReconciliationFinding.objects.get(check_name=name)


def test_a_paid_order_without_a_sent_receipt_is_repaired_through_the_outbox(
    broker, gateway, products
):
    stuck = paid_order(products)
    done = paid_order(products, receipt="sent")

    reconciler.run(repair=True)

    result = finding("paid_without_receipt")
    assert (result.found, result.repaired) == (1, 1)
    assert result.samples == [f"order {stuck.pk}"]
    assert_enqueued(SEND_RECEIPT, args=[stuck.pk])
    assert len(enqueued()) == 1
    assert broker.queue_lengths()["emails"] == 1
    assert Receipt.objects.get(order=done).status == "sent"


def test_a_receipt_whose_claim_outlived_its_lease_is_resent_without_waiting(
    broker, gateway, products
):
    # given: paid a moment ago; a worker died while sending, and the copy of that same
    # attempt redelivered at once (its worker lost) found the claim live and left it
    now = timezone.now()
    dead, live, owned = (paid_order(products) for _ in range(3))
    Order.objects.update(updated_at=now)  # too recent for paid_without_receipt
    Receipt.objects.update(status="sending", claimed_by="task-1/0", claimed_at=now)
    receipt_send(order_id=dead.pk, claimant="task-1", attempt=0)  # the redelivered copy
    assert Receipt.objects.get(order=dead).status == "sending"
    DeadLetter.objects.create(
        task_id="t", task_name=SEND_RECEIPT, args=[owned.pk], reason="retries_exhausted"
    )
    # when: the lease runs out for two of them (one an operator owns)
    Receipt.objects.exclude(order=live).update(claimed_at=now - CLAIM_LEASE * 2)
    reconciler.run(repair=True)

    result = finding("receipt_claim_expired")
    assert (result.found, result.repaired) == (2, 1)
    assert_enqueued(SEND_RECEIPT, args=[dead.pk])
    assert len(enqueued()) == 1
    assert finding("paid_without_receipt").found == 0  # that one would wait 45 minutes


def test_a_dry_run_reports_and_repairs_nothing(broker, gateway, products):
    paid_order(products, receipt=None)

    reconciler.run(repair=False)

    assert (finding("paid_without_receipt").found, finding("paid_without_receipt").repaired) == (
        1,
        0,
    )
    assert_nothing_enqueued()


def test_a_stuck_payment_is_recharged_unless_an_operator_owns_its_dead_letter(
    broker, gateway, products
):
    order = Order.objects.create(email="a@b.co", total="9.75")
    mine = Payment.objects.create(order=order, amount="9.75", card_token="tok_visa")
    other = Order.objects.create(email="a@b.co", total="9.75")
    theirs = Payment.objects.create(order=other, amount="9.75", card_token="tok_visa")
    Payment.objects.update(updated_at=LONG_AGO)
    DeadLetter.objects.create(
        task_id=str(uuid.uuid4()),
        task_name="shop.tasks.payments.charge_payment",
        args=[theirs.pk],
        reason="retries_exhausted",
    )

    reconciler.run(repair=True)

    assert (finding("payment_stuck").found, finding("payment_stuck").repaired) == (2, 1)
    assert [m.args for m in enqueued()] == [[mine.pk]]


def test_an_abandoned_receipt_is_never_resent_even_once_its_dead_letter_is_pruned(
    broker, gateway, products
):
    # given: an operator discarded the receipt's dead letter; retention has passed since
    order = paid_order(products)
    letter = DeadLetter.objects.create(
        task_id=str(uuid.uuid4()), task_name=SEND_RECEIPT, args=[order.pk], reason="poison"
    )
    assert dead_letter_discard(ids=[letter.pk], actor="alice").done == 1
    assert dead_letter_prune(older_than_days=0) == 1

    reconciler.run(repair=True)

    assert Receipt.objects.get(order=order).status == "abandoned"
    assert finding("paid_without_receipt").found == 0
    assert_nothing_enqueued()


def test_a_discarded_dead_letter_is_never_run_again_even_where_its_row_looks_stuck(
    broker, gateway, products
):
    # given: dead letters closed without their consequence (dead_letter_discard's
    # consequence=False), so the rows still look stuck: the letter alone says "decided"
    order = paid_order(products)
    Receipt.objects.filter(order=order).update(
        status="sending", claimed_by="task-1/0", claimed_at=LONG_AGO
    )
    _, payment = unpaid_order()
    age(payment.order)
    letters = [
        DeadLetter.objects.create(
            task_id=str(uuid.uuid4()), task_name=task, args=[arg], reason="retries_exhausted"
        )
        for task, arg in ((SEND_RECEIPT, order.pk), (CHARGE_PAYMENT, payment.pk))
    ]
    discarded = dead_letter_discard(
        ids=[letter.pk for letter in letters], actor="alice", consequence=False
    )
    assert discarded.done == 2

    reconciler.run(repair=True)

    for check in ("paid_without_receipt", "receipt_claim_expired", "payment_stuck"):
        assert (finding(check).found, finding(check).repaired) == (1, 0), check
    assert_nothing_enqueued()


def test_a_double_charge_is_reported_and_nothing_is_touched(broker, gateway, products):
    order = paid_order(products, receipt="sent")
    for _ in range(2):  # two charges for one order, under two different keys
        response = httpx.post(
            f"{gateway.url}/v1/charges",
            headers={"Idempotency-Key": str(uuid.uuid4())},
            json={
                "amount": "12.50",
                "currency": "EUR",
                "source": "tok_visa",
                "description": f"Order #{order.pk}",
            },
        )
        assert response.status_code == 201
    ledger_before = gateway.ledger()

    reconciler.run(repair=True)

    result = finding("ledger_mismatch")
    assert f"order {order.pk}: 2 charges" in result.samples
    assert result.repaired == 0
    assert gateway.ledger() == ledger_before
    assert_nothing_enqueued()
    assert Payment.objects.get(order=order).status == "charged"


def test_a_charge_the_shop_never_heard_of_is_reported_as_charged_not_paid(gateway, products):
    # given: the gateway charged an old order's key, and its answer never reached the shop
    order, payment = unpaid_order()
    response = charge_at_gateway(
        gateway, charge_description(order), key=str(payment.idempotency_key)
    )
    assert response.status_code == 201
    age(order)
    ledger_before = gateway.ledger()

    result = ledger_mismatch(repair=True)

    assert about(order, result.samples) == [f"order {order.pk}: charged, not paid"]
    assert (result.found, result.repaired) == (len(result.samples), 0)
    assert gateway.ledger() == ledger_before
    assert Order.objects.get(pk=order.pk).status == "pending"  # reported, not decided
    assert_nothing_enqueued()


def test_an_old_orders_charge_that_an_attempt_is_still_recording_is_not_reported(gateway, products):
    # given: an order from hours ago, its charge replayed by an operator a moment ago;
    # the gateway charged, the answer was lost, and the attempt's retry will ask for it.
    # Reported, the runbook would have the charge refunded by hand, and the order shipped.
    order, payment = unpaid_order()
    age(order)
    Payment.objects.filter(pk=payment.pk).update(status="unknown", updated_at=timezone.now())
    response = charge_at_gateway(
        gateway, charge_description(order), key=str(payment.idempotency_key)
    )
    assert response.status_code == 201

    result = ledger_mismatch(repair=True)

    assert about(order, result.samples) == []


def test_a_paid_order_with_no_charge_at_the_gateway_is_reported(gateway, products):
    order = paid_order(products, receipt="sent")

    result = ledger_mismatch(repair=True)

    assert about(order, result.samples) == [f"order {order.pk}: paid, no charge"]
    assert result.repaired == 0
    assert Order.objects.get(pk=order.pk).status == "paid"
    assert_nothing_enqueued()


def test_a_charge_that_names_no_order_is_reported(gateway, products):
    response = charge_at_gateway(gateway, "Charged by hand from the dashboard")
    assert response.status_code == 201

    result = ledger_mismatch(repair=True)

    assert f"charge {response.json()['id']}: no order reference" in result.samples
    assert result.repaired == 0


def test_a_declined_charge_is_no_mismatch_and_a_single_charge_neither(gateway, products):
    # given: an old order whose card was declined (in the ledger, as a declined charge),
    # and an old paid order charged once
    declined, payment = unpaid_order()
    response = charge_at_gateway(
        gateway,
        charge_description(declined),
        key=str(payment.idempotency_key),
        source="tok_chargeDeclined",
    )
    assert response.status_code == 402
    Order.objects.filter(pk=declined.pk).update(status="failed")
    Payment.objects.filter(pk=payment.pk).update(status="declined")
    age(declined)
    paid = paid_order(products, receipt="sent")
    assert charge_at_gateway(gateway, charge_description(paid)).status_code == 201

    result = ledger_mismatch(repair=True)

    assert about(declined, result.samples) == []
    assert about(paid, result.samples) == []


def test_a_paid_order_younger_than_the_threshold_does_not_have_its_receipt_resent(
    broker, gateway, products
):
    old, young = paid_order(products), paid_order(products)
    age(young, inside_the_threshold())

    result = paid_without_receipt(repair=True)

    assert (result.found, result.repaired, result.samples) == (1, 1, [f"order {old.pk}"])
    assert [m.args for m in enqueued()] == [[old.pk]]


def test_a_payment_younger_than_the_threshold_is_not_charged_again(broker, gateway, products):
    (old, old_payment), (young, _) = unpaid_order(), unpaid_order()
    age(old)
    age(young, inside_the_threshold())

    result = payment_stuck(repair=True)

    assert (result.found, result.repaired) == (1, 1)
    assert [m.args for m in enqueued()] == [[old_payment.pk]]


def test_the_ledger_check_leaves_orders_younger_than_the_threshold_alone(gateway, products):
    # given: a young order charged at the gateway, its answer on the way to the shop, and
    # a young paid order whose charge the ledger, read a moment earlier, did not hold yet
    charging, payment = unpaid_order()
    response = charge_at_gateway(
        gateway, charge_description(charging), key=str(payment.idempotency_key)
    )
    assert response.status_code == 201
    age(charging, inside_the_threshold())
    # (its payment untouched for long: the order's own age must keep it out, not the
    # payment's last attempt, which another rule looks at)
    Payment.objects.filter(pk=payment.pk).update(updated_at=LONG_AGO)
    just_paid = paid_order(products, receipt="sent")
    age(just_paid, inside_the_threshold())

    result = ledger_mismatch(repair=True)

    assert about(charging, result.samples) == []
    assert about(just_paid, result.samples) == []


def test_the_command_prints_each_check_and_the_gaps_are_metrics(
    client, broker, gateway, products, capsys
):
    stuck = paid_order(products)

    call_command("reconcile", "--dry-run")

    out = capsys.readouterr().out
    assert f"paid_without_receipt: found 1, repaired 0 (e.g. order {stuck.pk})" in out
    assert "receipt_resent: found 0, repaired 0" in out
    assert value(scrape(client), "jobs_reconciliation_gap", check="paid_without_receipt") == 1


def test_a_check_that_cannot_run_says_so_keeps_its_findings_and_the_others_still_run(
    client, broker, gateway, products, settings
):
    from shop.gateway import client as gateway_client
    from tests.helpers import free_port

    httpx.post(  # a charge that names no order: the ledger check reports it
        f"{gateway.url}/v1/charges",
        headers={"Idempotency-Key": str(uuid.uuid4())},
        json={
            "amount": "1.00",
            "currency": "EUR",
            "source": "tok_visa",
            "description": "not an order",
        },
    )
    reconciler.run(repair=False)
    found = finding("ledger_mismatch").found
    stuck = paid_order(products)
    # when: the gateway's ledger cannot be read
    settings.PAYMENT_GATEWAY_URL = f"http://127.0.0.1:{free_port()}"
    gateway_client._clients.clear()

    reconciler.run(repair=True)

    blind = finding("ledger_mismatch")
    assert blind.error.startswith("GatewayUnavailable: ")
    assert found > 0
    assert blind.found == found  # what it last saw, not a reassuring zero
    assert finding("paid_without_receipt").samples == [f"order {stuck.pk}"]  # still ran
    metrics = scrape(client)
    assert value(metrics, "jobs_reconciliation_check_failed", check="ledger_mismatch") == 1
    assert value(metrics, "jobs_reconciliation_check_failed", check="paid_without_receipt") == 0


def test_the_reconciler_must_wait_out_the_longest_retry_budget(settings):
    from shop.checks import reconciler_waits_out_the_retries

    assert reconciler_waits_out_the_retries() == []  # the shipped settings
    settings.RECONCILE_AFTER_MINUTES = 10  # the old default: jobs retry for up to 28.5 min

    [error] = reconciler_waits_out_the_retries()

    assert error.id == "shop.E001"
    assert "1710 s at most" in error.msg


def test_the_reconciler_waits_out_a_tasks_own_longer_retry_policy(monkeypatch):
    from jobs import app
    from shop.checks import reconciler_waits_out_the_retries

    task = type(app.tasks["shop.tasks.emails.send_receipt"])
    monkeypatch.setattr(task, "max_retries", 30, raising=False)  # a policy of its own

    [error] = reconciler_waits_out_the_retries()

    assert error.id == "shop.E001"
    assert "7110 s at most" in error.msg  # 2+4+...+256, then 300 s 22 times


# --- cost as the tables grow (make bench, scenario 10) ------------------------------


def dead_letter_queries(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if '"jobs_deadletter"' in q["sql"]]


@pytest.mark.parametrize("stuck", [2, 12])
def test_the_repairs_ask_once_which_jobs_an_operator_owns_however_many_there_are(
    broker, gateway, products, stuck
):
    orders = [paid_order(products) for _ in range(stuck)]
    payments = []
    for _ in range(stuck):
        order = Order.objects.create(email="a@b.co", total="9.75")
        payments.append(Payment.objects.create(order=order, amount="9.75", card_token="tok_visa"))
    Payment.objects.update(updated_at=LONG_AGO)
    for task, arg in ((SEND_RECEIPT, orders[0].pk), (CHARGE_PAYMENT, payments[0].pk)):
        DeadLetter.objects.create(
            task_id=str(uuid.uuid4()), task_name=task, args=[arg], reason="retries_exhausted"
        )

    with CaptureQueriesContext(connection) as queries:
        receipts = paid_without_receipt(repair=True)
        charges = payment_stuck(repair=True)

    assert (receipts.found, receipts.repaired) == (stuck, stuck - 1)
    assert (charges.found, charges.repaired) == (stuck, stuck - 1)
    assert {tuple(m.args) for m in enqueued()} == {
        *((o.pk,) for o in orders[1:]),
        *((p.pk,) for p in payments[1:]),
    }
    assert len(dead_letter_queries(queries)) == 2  # one per check, not one per job


def test_the_ledger_check_sends_the_database_no_list_of_paid_orders(broker, products, monkeypatch):
    unpaid = Order.objects.create(email="a@b.co", total="9.75", status="failed")
    Order.objects.filter(pk=unpaid.pk).update(created_at=LONG_AGO)
    orders: list[Order] = []
    ledger: list[dict[str, str]] = [{"id": "ch_0", "status": "succeeded", "description": ""}]
    monkeypatch.setattr(reconcile.gateway, "charges_list", lambda: ledger)
    statements = []
    moment = re.compile(r"'[^']*'::timestamptz")  # the cutoff, a moment later
    for paid in (3, 30):
        orders += [paid_order(products, receipt="sent") for _ in range(paid - len(orders))]
        ledger[1:] = [  # the first paid order has no charge; the failed one has one
            {"id": f"ch_{o.pk}", "status": "succeeded", "description": f"Order #{o.pk} (r)"}
            for o in [*orders[1:], unpaid]
        ]

        with CaptureQueriesContext(connection) as queries:
            result = reconcile.ledger_mismatch(repair=True)

        assert sorted(result.samples) == sorted(
            [
                "charge ch_0: no order reference",
                f"order {orders[0].pk}: paid, no charge",
                f"order {unpaid.pk}: charged, not paid",
            ]
        )
        statements.append([moment.sub("", q["sql"]) for q in queries.captured_queries])
    # The same statements for 30 paid orders as for 3: no list of their ids in them.
    assert statements[0] == statements[1]
