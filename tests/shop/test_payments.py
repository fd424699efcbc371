"""charge_payment and send_receipt logic against the real gateway process: run twice,
run concurrently, declined, flaky, timed out. Task logic only; the worker behaviour is in
test_end_to_end.py."""

from decimal import Decimal

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.utils import timezone

from jobs.errors import PermanentError, TransientError
from jobs.models import OutboxMessage
from shop.gateway import client as gateway_client
from shop.models import Order, Payment, Product, Receipt
from shop.services.checkout import checkout_complete, checkout_parse
from shop.services.payments import payment_charge
from shop.services.receipts import receipt_send
from tests.processes import run_concurrently

GOOD, DECLINED, FLAKY = "4242424242424242", "4000000000000002", "4000000000000119"
SEND_RECEIPT = "shop.tasks.emails.send_receipt"


def place_order(card: str = GOOD) -> Payment:
    request = checkout_parse(
        {"email": "ada@example.com", "card": card, "items": [{"sku": "MUG", "quantity": 2}]}
    )
    return checkout_complete(request=request).order.payment


def mails_with(mail_dir, message_id: str) -> int:
    return sum(message_id in path.read_text() for path in mail_dir.iterdir())


@pytest.mark.django_db(transaction=True)
def test_charging_twice_charges_once_and_enqueues_one_receipt(broker, gateway, products):
    payment = place_order()

    payment_charge(payment_id=payment.pk)
    payment_charge(payment_id=payment.pk)

    payment.refresh_from_db()
    [charge] = gateway.ledger(str(payment.idempotency_key))
    assert (charge["status"], charge["id"]) == ("succeeded", payment.gateway_charge_id)
    assert payment.status == Payment.Status.CHARGED
    assert Order.objects.get().status == Order.Status.PAID
    assert Receipt.objects.filter(order=payment.order).count() == 1
    assert OutboxMessage.objects.filter(task_name=SEND_RECEIPT).count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_charges_charge_once_and_enqueue_one_receipt(broker, gateway, products):
    payment = place_order()
    gateway.control(latency_ms=300)  # both runs are inside the gateway call together

    errors = run_concurrently(lambda: payment_charge(payment_id=payment.pk))

    assert errors == []
    payment.refresh_from_db()
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1
    assert payment.status == Payment.Status.CHARGED
    assert Receipt.objects.count() == 1
    assert OutboxMessage.objects.filter(task_name=SEND_RECEIPT).count() == 1


@pytest.mark.django_db(transaction=True)
def test_declined_card_fails_the_order_releases_stock_and_is_not_an_error(
    broker, gateway, products
):
    payment = place_order(DECLINED)

    payment_charge(payment_id=payment.pk)  # returns: a decline is an outcome, not a failure
    payment_charge(payment_id=payment.pk)  # a redelivery afterwards does nothing

    payment.refresh_from_db()
    assert payment.status == Payment.Status.DECLINED
    assert payment.failure_message == "Your card was declined."
    assert Order.objects.get().status == Order.Status.FAILED
    assert Product.objects.get(sku="MUG").stock == 10  # reserved stock released
    assert not Receipt.objects.exists()
    assert [c["status"] for c in gateway.ledger(str(payment.idempotency_key))] == ["declined"]


@pytest.mark.django_db(transaction=True)
def test_flaky_card_is_transient_until_the_gateway_charges(broker, gateway, products):
    payment = place_order(FLAKY)

    for _ in range(2):
        with pytest.raises(TransientError, match="503"):
            payment_charge(payment_id=payment.pk)
        assert Payment.objects.get().status == Payment.Status.PENDING
    payment_charge(payment_id=payment.pk)

    assert Payment.objects.get().status == Payment.Status.CHARGED
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


@pytest.mark.django_db(transaction=True)
def test_timeout_leaves_payment_unknown_and_the_retry_asks_before_charging(
    broker, gateway, products, settings
):
    payment = place_order()
    settings.PAYMENT_GATEWAY_TIMEOUT = (1.0, 0.5)
    gateway_client._clients.clear()
    gateway.control(timeout_rate=1, timeout_seconds=2)

    # when: the gateway records the charge but answers after our read timeout
    with pytest.raises(TransientError, match="unknown"):
        payment_charge(payment_id=payment.pk)

    # then: we do not know, and say so; the gateway did charge
    assert Payment.objects.get().status == Payment.Status.UNKNOWN
    [charge] = gateway.ledger(str(payment.idempotency_key))
    # when: the retry runs with the gateway healthy again
    gateway.control(timeout_rate=0)
    payment_charge(payment_id=payment.pk)
    # then: it found the charge instead of making a second one
    payment.refresh_from_db()
    assert (payment.status, payment.gateway_charge_id) == (Payment.Status.CHARGED, charge["id"])
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


@pytest.mark.django_db(transaction=True)
def test_gateway_down_is_transient_and_charges_nothing(broker, gateway, products):
    payment = place_order()
    gateway.control(outage=True)

    with pytest.raises(TransientError):
        payment_charge(payment_id=payment.pk)

    assert Payment.objects.get().status == Payment.Status.PENDING
    assert gateway.ledger(str(payment.idempotency_key)) == []


@pytest.mark.django_db(transaction=True)
def test_soft_time_limit_mid_charge_leaves_payment_unknown_for_the_retry(
    broker, gateway, products, monkeypatch
):
    payment = place_order()

    def interrupted(**_: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(gateway_client, "charge_create", interrupted)
    with pytest.raises(TransientError, match="unknown"):
        payment_charge(payment_id=payment.pk)
    assert Payment.objects.get().status == Payment.Status.UNKNOWN

    # the retry asks the gateway first (nothing under this key), then charges once
    monkeypatch.undo()
    payment_charge(payment_id=payment.pk)
    assert Payment.objects.get().status == Payment.Status.CHARGED
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


@pytest.mark.django_db
def test_missing_rows_that_must_exist_are_permanent_errors():
    with pytest.raises(PermanentError, match="does not exist"):
        payment_charge(payment_id=424242)
    with pytest.raises(PermanentError, match="no receipt"):
        receipt_send(order_id=424242)


@pytest.mark.django_db(transaction=True)
def test_sending_a_receipt_twice_sends_one_mail(broker, gateway, products, mail_dir):
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    receipt = Receipt.objects.get()

    receipt_send(order_id=payment.order_id)
    receipt_send(order_id=payment.order_id)

    receipt.refresh_from_db()
    assert receipt.status == Receipt.Status.SENT
    assert receipt.attempts == 1
    assert mails_with(mail_dir, receipt.message_id) == 1
    assert "Total: EUR 25.00" in next(mail_dir.iterdir()).read_text()
    assert Decimal("25.00") == payment.amount


@pytest.mark.django_db(transaction=True)
def test_concurrent_receipt_sends_send_one_mail(broker, gateway, products, mail_dir):
    payment = place_order()
    payment_charge(payment_id=payment.pk)

    errors = run_concurrently(lambda: receipt_send(order_id=payment.order_id), times=4)

    receipt = Receipt.objects.get()
    assert receipt.status == Receipt.Status.SENT
    assert mails_with(mail_dir, receipt.message_id) == 1
    # a loser either saw `sent` and returned, or saw the live claim and asked to retry
    assert all(type(error).__name__ == "ReceiptBusy" for error in errors)


@pytest.mark.django_db(transaction=True)
def test_a_retry_of_the_same_task_takes_its_own_claim_over_and_another_task_waits(
    broker, gateway, products, mail_dir
):
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    # given: task A claimed the receipt and died after sending (the row says `sending`)
    Receipt.objects.update(status="sending", claimed_by="task-A", claimed_at=timezone.now())

    # when: another task comes along within the lease, it must wait
    with pytest.raises(TransientError, match="another worker"):
        receipt_send(order_id=payment.order_id, claimant="task-B")
    # when: A's own retry comes, it takes the claim over at once and sends
    receipt_send(order_id=payment.order_id, claimant="task-A")

    receipt = Receipt.objects.get()
    assert (receipt.status, receipt.claimed_by) == ("sent", "task-A")
    assert mails_with(mail_dir, receipt.message_id) == 1
