"""The order flow on real processes: one prefork worker per queue, the gateway process,
PostgreSQL and a private Redis. The witnesses are external: the gateway's own ledger and
the mail folder, not the shop's bookkeeping."""

import json
import re
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django_celery_results.models import TaskResult

from jobs import app
from jobs.models import DeadLetter, OutboxMessage
from jobs.testing import assert_enqueued
from shop.models import Order, Payment, Product, Receipt, ReportRun
from tests.helpers import (
    ORDER,
    Worker,
    mails_with,
    place_order,
    status_url,
    wait_for_receipt,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

DECLINED, FLAKY = "tok_chargeDeclined", "tok_flaky"  # the gateway's test tokens


def finished(workers: dict[str, Worker], task_id: str, timeout: float = 30) -> Worker:
    """The worker that logged `task_id` as succeeded, once one has."""
    return wait_until(
        lambda: next((w for w in workers.values() if w.succeeded(task_id)), None),
        timeout=timeout,
        what=f"task {task_id}",
    )


def test_an_order_is_charged_once_and_receipted_by_the_queue_workers(
    client, workers, gateway, mail_dir, products
):
    order_id = place_order(client)

    body = wait_for_receipt(client, order_id)

    assert (body["status"], body["payment"]["status"]) == ("paid", "charged")
    payment = Payment.objects.get(order_id=order_id)
    [charge] = gateway.ledger(str(payment.idempotency_key))
    assert (charge["status"], charge["id"]) == ("succeeded", payment.gateway_charge_id)
    receipt = Receipt.objects.get(order_id=order_id)
    assert mails_with(mail_dir, receipt.message_id) == 1
    # each task ran on the worker of its own queue
    [charge] = assert_enqueued("shop.tasks.payments.charge_payment")
    [send] = assert_enqueued("shop.tasks.emails.send_receipt")
    assert finished(workers, str(charge.task_id)) is workers["payments"]
    assert finished(workers, str(send.task_id)) is workers["emails"]
    # and neither stored a result: nobody reads one (a transaction per task saved)
    assert not TaskResult.objects.exists()


def test_delivering_both_tasks_again_changes_nothing(client, workers, gateway, mail_dir, products):
    order_id = place_order(client)
    wait_for_receipt(client, order_id)
    payment = Payment.objects.get(order_id=order_id)

    # when: both tasks are delivered twice more (as a redelivery or a replay would)
    duplicates = [
        app.send_task(name, args=[arg], task_id=str(uuid.uuid4())).id
        for name, arg in [
            ("shop.tasks.payments.charge_payment", payment.pk),
            ("shop.tasks.emails.send_receipt", order_id),
        ]
        for _ in range(2)
    ]
    for task_id in duplicates:
        finished(workers, task_id)

    # then: one charge in the gateway's ledger, one receipt row, one mail
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1
    assert Receipt.objects.filter(order_id=order_id).count() == 1
    assert mails_with(mail_dir, Receipt.objects.get(order_id=order_id).message_id) == 1
    assert_enqueued("shop.tasks.emails.send_receipt")


def test_broker_down_at_checkout_the_order_completes_after_recovery(
    client, workers, gateway, mail_dir, broker, products
):
    with broker.down():
        # when: Redis is down while the shopper checks out
        order_id = place_order(client)  # still 201: the order is accepted
        message = OutboxMessage.objects.get()
        assert message.sent_at is None
        assert Order.objects.get(pk=order_id).status == Order.Status.PENDING

    # then: the relay publishes the row and the workers (reconnected) finish the order
    call_command("outbox_relay", grace=0)
    body = wait_for_receipt(client, order_id, timeout=90)

    assert body["status"] == "paid"
    payment = Payment.objects.get(order_id=order_id)
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


def test_the_sales_report_runs_on_the_reports_worker(client, workers, products):
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))
    response = client.post("/api/reports/sales/")

    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert finished(workers, task_id) is workers["reports"]
    result = TaskResult.objects.get(task_id=task_id)  # the one task that keeps its result
    path = Path(json.loads(result.result))
    assert path.read_text().splitlines()[0] == "sku,name,units,revenue"
    assert ReportRun.objects.get(task_id=response.json()["task_id"]).status == "done"


def dead_letter_of(task_name: str, timeout: float = 30) -> DeadLetter:
    return wait_until(
        lambda: DeadLetter.objects.filter(task_name=task_name).first(),
        timeout=timeout,
        what=f"a dead letter of {task_name}",
    )


def test_a_card_that_fails_transiently_is_retried_and_charged_once(
    client, workers, gateway, mail_dir, products
):
    order_id = place_order(client, FLAKY)

    body = wait_for_receipt(client, order_id)

    assert body["payment"]["status"] == "charged"
    payment = Payment.objects.get(order_id=order_id)
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1
    assert not DeadLetter.objects.exists()


def order_settled(client, order_id: int, status: str, timeout: float = 30) -> dict:
    return wait_until(
        lambda: (body := client.get(status_url(order_id)).json())["status"] == status and body,
        timeout=timeout,
        what=f"order {order_id} {status}",
    )


def test_a_declined_card_fails_the_order_without_a_dead_letter_and_the_customer_sees_it(
    client, workers, gateway, products
):
    order_id = place_order(client, DECLINED)

    body = order_settled(client, order_id, "failed")

    payment = Payment.objects.get(order_id=order_id)
    assert (body["payment"]["status"], body["payment"]["message"]) == (
        "declined",
        "Your card was declined.",
    )
    assert [c["status"] for c in gateway.ledger(str(payment.idempotency_key))] == ["declined"]
    assert Product.objects.get(sku="MUG").stock == 10  # released
    [charge] = assert_enqueued("shop.tasks.payments.charge_payment")
    finished(workers, str(charge.task_id))
    assert not DeadLetter.objects.exists()  # a business outcome, not a failure
    page = client.get(status_url(order_id).removeprefix("/api")).content.decode()
    assert "Payment failed" in page
    assert "Your card was declined." in page


def dead_charge_and_an_operator(client, gateway, permission: str) -> tuple[int, DeadLetter]:
    """An order whose charge ran out of retries while the gateway was down (it is back
    now), and an operator logged in with `permission` on the dead letters."""
    from django.contrib.auth.models import Permission, User

    gateway.control(outage=True)
    order_id = place_order(client)
    letter = dead_letter_of("shop.tasks.payments.charge_payment")
    gateway.control(outage=False)
    operator = User.objects.create_user("operator", password="pw", is_staff=True)
    operator.user_permissions.set(
        Permission.objects.filter(codename__in=["view_deadletter", permission])
    )
    client.force_login(operator)
    return order_id, letter


def test_an_operator_discards_a_dead_charge_and_the_order_ends_without_a_charge(
    client, workers, gateway, products, settings
):
    # given: an order whose charge died while the gateway was down, the gateway back
    order_id, letter = dead_charge_and_an_operator(client, gateway, "discard_deadletter")

    # when: the operator discards it, and the reconciler runs with the workers listening
    response = client.post(
        "/admin/jobs/deadletter/",
        {"action": "discard_selected", "_selected_action": [letter.pk]},
        follow=True,
    )
    settings.RECONCILE_AFTER_MINUTES = 0
    call_command("reconcile")

    # then: the order is cancelled for good, its stock back, and the card never charged
    assert [str(m) for m in response.context["messages"]] == ["1 dead letter discarded."]
    body = client.get(status_url(order_id)).json()
    assert (body["status"], body["payment"]["status"]) == ("cancelled", "cancelled")
    assert Product.objects.get(sku="MUG").stock == 10
    payment = Payment.objects.get(order_id=order_id)
    assert_enqueued(letter.task_name)  # the checkout's own: the reconciler enqueued nothing
    assert gateway.ledger(str(payment.idempotency_key)) == []
    page = client.get(status_url(order_id).removeprefix("/api")).content.decode()
    assert "This order was cancelled" in page


def test_a_gateway_outage_exhausts_the_retries_and_charges_nothing(
    client, workers, gateway, products
):
    gateway.control(outage=True)

    order_id = place_order(client)

    letter = dead_letter_of("shop.tasks.payments.charge_payment")
    payment = Payment.objects.get(order_id=order_id)
    assert (letter.reason, letter.attempts) == ("retries_exhausted", 4)
    assert letter.exception_class == "shop.gateway.client.GatewayUnavailable"
    assert payment.status == Payment.Status.UNKNOWN  # attempts were made: the next one asks
    assert gateway.ledger(str(payment.idempotency_key)) == []


def test_an_operator_replays_the_dead_letter_from_the_admin_and_the_order_completes(
    client, workers, gateway, mail_dir, products
):
    # given: an order whose charge died while the gateway was down
    order_id, letter = dead_charge_and_an_operator(client, gateway, "replay_deadletter")

    # when: the operator replays it from the admin
    response = client.post(
        "/admin/jobs/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
        follow=True,
    )

    # then: the order completes, charged once, and the audit trail says who and how
    assert [str(m) for m in response.context["messages"]] == ["1 dead letter replayed."]
    body = wait_for_receipt(client, order_id)
    assert body["payment"]["status"] == "charged"
    payment = Payment.objects.get(order_id=order_id)
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1
    letter.refresh_from_db()
    assert (letter.status, letter.handled_by) == ("replayed", "operator")
    assert letter.replay_task_id
    wait_until(
        lambda: DeadLetter.objects.get(pk=letter.pk).replay_outcome == "succeeded",
        timeout=10,
        what="the replay's outcome",
    )
    # and a second replay of the same row is refused
    again = client.post(
        "/admin/jobs/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
        follow=True,
    )
    assert [str(m) for m in again.context["messages"]] == [
        "1 was not replayed: only dead letters in state 'dead' can be."
    ]
    assert_enqueued(letter.task_name, count=2)  # order + replay


def test_the_request_id_follows_the_charge_through_its_retries_into_logs_and_dead_letter(
    client, workers, gateway, products
):
    gateway.control(outage=True)

    response = client.post(
        "/api/orders/",
        ORDER,
        content_type="application/json",
        headers={"X-Request-ID": "checkout-0042"},
    )

    letter = dead_letter_of("shop.tasks.payments.charge_payment")
    assert response.status_code == 201
    assert (letter.correlation_id, letter.attempts) == ("checkout-0042", 4)
    lines = [
        json.loads(line)
        for line in workers["payments"].log_text().splitlines()
        if line.startswith("{") and "checkout-0042" in line
    ]
    events = [(line["event"], line["attempt"]) for line in lines if line.get("event")]
    assert [e for e in events if e[0] == "started"] == [("started", n) for n in range(1, 5)]
    assert ("dead_lettered", 4) in events
    assert all(
        re.fullmatch(r"[0-9a-f-]{36}", line["task_id"]) for line in lines if "task_id" in line
    )


def test_metrics_follow_a_real_worker_run(client, workers, gateway, mail_dir, products):
    from jobs import metrics
    from tests.helpers import scrape, value

    charge, receipt = "shop.tasks.payments.charge_payment", "shop.tasks.emails.send_receipt"
    on_payments = {"task": charge, "queue": "payments"}
    metrics._consumers_cache = (0.0, {})  # counted by this test's workers, not a cached count
    before = scrape(client)

    # one order that retries twice, then is paid; one that is declined (no dead letter)
    flaky = place_order(client, FLAKY)
    wait_for_receipt(client, flaky)
    order_settled(client, place_order(client, DECLINED), "failed")
    wait_until(
        lambda: (
            value(scrape(client), "jobs_tasks_succeeded_total", **on_payments)
            - value(before, "jobs_tasks_succeeded_total", **on_payments)
            == 2
        ),
        timeout=10,
        what="the decline counted as a success",
    )
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("jobs_tasks_enqueued_total", **on_payments) == 2
    assert delta("jobs_tasks_started_total", **on_payments) == 4  # 3 flaky attempts + 1
    assert delta("jobs_tasks_retried_total", **on_payments) == 2
    assert delta("jobs_tasks_succeeded_total", **on_payments) == 2  # the decline too
    assert delta("jobs_tasks_failed_total", **on_payments) == 0
    assert delta("jobs_tasks_succeeded_total", task=receipt, queue="emails") == 1
    assert delta("jobs_dead_letters_total", reason="permanent_error", **on_payments) == 0
    assert delta("jobs_task_runtime_seconds_count", **on_payments) == 4
    assert delta("jobs_task_queue_wait_seconds_count", **on_payments) == 4
    assert value(after, "jobs_dead_letters", reason="permanent_error", status="dead") == 0
    assert value(after, "jobs_queue_consumers", queue="payments") == 1
    assert value(after, "jobs_worker_slots", queue="payments") == 1  # one process
    # utilization's numerator: every run's time, the retried ones too
    busy = delta("jobs_worker_busy_seconds_total", **on_payments)
    assert busy >= delta("jobs_task_runtime_seconds_sum", **on_payments) > 0
    assert value(after, "jobs_queue_depth", queue="payments") == 0
