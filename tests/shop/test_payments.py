"""charge_payment and send_receipt logic against the real gateway process: run twice,
run concurrently, declined, flaky, timed out. Task logic only; the worker behaviour is in
test_end_to_end.py."""

import math
import socket
import threading
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from billiard.exceptions import WorkerLostError
from celery.app.task import Context
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.signals import task_retry
from django.utils import timezone

from jobs import deadline, dependencies
from jobs.dependencies import Deferred
from jobs.errors import PermanentError, TransientError
from jobs.testing import assert_enqueued
from shop.gateway import client as gateway_client
from shop.gateway.client import GATEWAY
from shop.models import Order, Payment, Product, Receipt
from shop.services import payments, receipts
from shop.services.checkout import checkout_complete, checkout_parse
from shop.services.payments import (
    charge_description,
    order_number,
    payment_charge,
    payment_mark_charged,
    payment_mark_declined,
)
from shop.services.receipts import (
    CLAIM_LEASE,
    MAIL,
    _mail_server_failed,
    receipt_release,
    receipt_send,
)
from shop.tasks.emails import send_receipt
from tests.helpers import free_port, run_concurrently

GOOD, DECLINED, FLAKY = "tok_visa", "tok_chargeDeclined", "tok_flaky"  # test tokens
SEND_RECEIPT = "shop.tasks.emails.send_receipt"


def place_order(card: str = GOOD) -> Payment:
    request = checkout_parse(
        {"email": "ada@example.com", "card_token": card, "items": [{"sku": "MUG", "quantity": 2}]}
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
    assert_enqueued(SEND_RECEIPT, args=[payment.order_id])


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
    assert_enqueued(SEND_RECEIPT, args=[payment.order_id])


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


@pytest.mark.django_db
def test_a_payment_ends_once_and_the_run_that_ended_it_is_the_one_told_so(products):
    payment = place_order()

    assert payment_mark_charged(payment_id=payment.pk, charge_id="ch_first") is True
    assert payment_mark_charged(payment_id=payment.pk, charge_id="ch_second") is False
    assert payment_mark_declined(payment_id=payment.pk, message="too late") is False

    payment.refresh_from_db()
    assert (payment.status, payment.gateway_charge_id) == (Payment.Status.CHARGED, "ch_first")
    assert payment.failure_message == ""
    assert Receipt.objects.filter(order=payment.order).count() == 1
    assert_enqueued(SEND_RECEIPT, args=[payment.order_id])


@pytest.mark.django_db
def test_a_long_decline_message_is_kept_to_the_columns_300_characters(products):
    payment = place_order()
    message = "declined: " + "x" * 400

    assert payment_mark_declined(payment_id=payment.pk, message=message) is True

    payment.refresh_from_db()
    assert payment.failure_message == message[:300]


@pytest.mark.django_db
def test_a_payment_settled_between_the_check_and_the_claim_is_left_to_its_settler(
    products, monkeypatch
):
    payment = place_order()

    def settled_meanwhile(order: Order) -> str:
        # another attempt charges it after this one read it `pending`, before the claim
        Payment.objects.filter(pk=payment.pk).update(status=Payment.Status.CHARGED)
        return charge_description(order)

    def no_call(**_: Any) -> None:
        raise AssertionError("the gateway was called for a settled payment")

    monkeypatch.setattr(payments, "charge_description", settled_meanwhile)
    monkeypatch.setattr(payments.gateway, "charge_lookup", no_call)
    monkeypatch.setattr(payments.gateway, "charge_create", no_call)

    payment_charge(payment_id=payment.pk)

    assert Payment.objects.get(pk=payment.pk).status == Payment.Status.CHARGED


@pytest.mark.django_db(transaction=True)
def test_flaky_card_is_transient_until_the_gateway_charges(broker, gateway, products):
    payment = place_order(FLAKY)

    for _ in range(2):
        with pytest.raises(TransientError, match="503"):
            payment_charge(payment_id=payment.pk)
        assert Payment.objects.get().status == Payment.Status.UNKNOWN  # the next one asks
    payment_charge(payment_id=payment.pk)

    assert Payment.objects.get().status == Payment.Status.CHARGED
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


def gateway_calls(gateway) -> tuple[int, int]:
    """(requests, charge requests) the gateway has received so far: its own count, which
    tells a lookup from a charge that the gateway merely replayed for the key."""
    totals = gateway.stats()["totals"]
    return totals["received"], totals["charges"]


def answers_too_late(gateway, settings) -> None:
    """The gateway records each new charge, then answers after our 0.5 s read timeout."""
    settings.PAYMENT_GATEWAY_TIMEOUT = (1.0, 0.5)
    gateway_client._clients.clear()
    gateway.control(timeout_rate=1, timeout_seconds=2)


@pytest.mark.django_db(transaction=True)
def test_timeout_leaves_payment_unknown_and_the_retry_asks_before_charging(
    broker, gateway, products, settings
):
    payment = place_order()
    answers_too_late(gateway, settings)

    # when: the gateway records the charge but answers after our read timeout
    with pytest.raises(TransientError, match="unknown"):
        payment_charge(payment_id=payment.pk)

    # then: we do not know, and say so; the gateway did charge
    assert Payment.objects.get().status == Payment.Status.UNKNOWN
    [charge] = gateway.ledger(str(payment.idempotency_key))
    # when: the retry runs with the gateway healthy again
    gateway.control(timeout_rate=0)
    received, charges = gateway_calls(gateway)
    payment_charge(payment_id=payment.pk)
    # then: it asked (one lookup by the key) and sent no charge request, not even one the
    # gateway would have answered from its idempotency key
    assert gateway_calls(gateway) == (received + 1, charges)
    payment.refresh_from_db()
    assert (payment.status, payment.gateway_charge_id) == (Payment.Status.CHARGED, charge["id"])
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


@pytest.mark.django_db(transaction=True)
def test_gateway_down_is_transient_and_charges_nothing(broker, gateway, products):
    payment = place_order()
    gateway.control(outage=True)

    with pytest.raises(TransientError):
        payment_charge(payment_id=payment.pk)

    # An attempt was made (a processor's 5xx may come after the work): the next one asks.
    assert Payment.objects.get().status == Payment.Status.UNKNOWN
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

    # the retry asks the gateway first (nothing by the key, nor by the order), then charges
    monkeypatch.undo()
    received, charges = gateway_calls(gateway)
    payment_charge(payment_id=payment.pk)
    assert gateway_calls(gateway) == (received + 3, charges + 1)
    assert Payment.objects.get().status == Payment.Status.CHARGED
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1


@pytest.mark.django_db(transaction=True)
def test_the_payment_is_unknown_before_the_request_leaves_so_a_crash_mid_call_asks_first(
    broker, gateway, products, monkeypatch
):
    payment = place_order()
    seen: list[str] = []
    real_create = gateway_client.charge_create

    def create_and_die(**kwargs: Any) -> None:
        seen.append(Payment.objects.get().status)
        real_create(**kwargs)  # the gateway charges...
        raise SystemExit("the worker process is killed before the answer is read")

    monkeypatch.setattr(gateway_client, "charge_create", create_and_die)
    with pytest.raises(SystemExit):
        payment_charge(payment_id=payment.pk)
    monkeypatch.undo()
    received, charges = gateway_calls(gateway)
    payment_charge(payment_id=payment.pk)  # the redelivery

    assert seen == ["unknown"]  # what a killed process leaves behind
    assert gateway_calls(gateway) == (received + 1, charges)  # it asked, and charged nothing
    payment.refresh_from_db()
    [charge] = gateway.ledger(str(payment.idempotency_key))
    assert (payment.status, payment.gateway_charge_id) == ("charged", charge["id"])


@pytest.mark.django_db(transaction=True)
def test_a_lost_answer_whose_key_the_gateway_forgot_is_found_by_the_order_and_not_recharged(
    broker, gateway, products, settings
):
    payment = place_order()
    answers_too_late(gateway, settings)
    with pytest.raises(TransientError, match="unknown"):
        payment_charge(payment_id=payment.pk)  # charged at the gateway, the answer lost
    # when: days pass (the gateway forgets the key), then an operator replays the charge
    gateway.control(timeout_rate=0, key_ttl_seconds=0.2)
    time.sleep(0.3)
    assert gateway.ledger(str(payment.idempotency_key)) == []  # forgotten

    payment_charge(payment_id=payment.pk)

    payment.refresh_from_db()
    description = charge_description(payment.order)
    charges = [c for c in gateway.ledger() if c["description"] == description]
    assert [c["status"] for c in charges] == ["succeeded"]  # one charge, not two
    assert (payment.status, payment.gateway_charge_id) == ("charged", charges[0]["id"])
    gateway.control(key_ttl_seconds=86400)


@pytest.mark.django_db(transaction=True)
def test_a_lookup_that_finds_a_decline_fails_the_order_without_charging(
    broker, gateway, products, monkeypatch
):
    payment = place_order(DECLINED)
    Payment.objects.update(status=Payment.Status.UNKNOWN)  # an earlier attempt was cut off
    response = httpx.post(
        f"{gateway.url}/v1/charges",
        headers={"Idempotency-Key": str(payment.idempotency_key)},
        json={"amount": str(payment.amount), "currency": "EUR", "source": DECLINED},
    )
    assert response.status_code == 402
    monkeypatch.setattr(gateway_client, "charge_create", pytest.fail)

    payment_charge(payment_id=payment.pk)

    payment.refresh_from_db()
    assert (payment.status, payment.order.status) == ("declined", "failed")
    assert Product.objects.get(sku="MUG").stock == 10


def test_an_answer_cut_off_after_the_request_was_sent_is_an_unknown_outcome(settings):
    # A server that reads the request, then closes the connection without answering.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def swallow() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=swallow)
    thread.start()
    settings.PAYMENT_GATEWAY_URL = f"http://127.0.0.1:{port}"
    gateway_client._clients.clear()
    try:
        with pytest.raises(gateway_client.OutcomeUnknown, match="answer lost"):
            gateway_client.charge_create(
                idempotency_key="k",
                amount=Decimal("1.00"),
                currency="EUR",
                card_token=GOOD,
                description="d",
            )
    finally:
        thread.join(timeout=5)
        server.close()
        gateway_client._clients.clear()


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

    errors = run_concurrently(
        lambda: receipt_send(order_id=payment.order_id, claimant="task-A"), times=4
    )

    receipt = Receipt.objects.get()
    assert receipt.status == Receipt.Status.SENT
    assert mails_with(mail_dir, receipt.message_id) == 1
    # four live copies of one message: the losers saw `sent`, or the live claim, and left
    assert errors == []


@pytest.mark.django_db(transaction=True)
def test_a_live_claim_is_left_by_every_other_delivery_even_a_later_attempt(
    broker, gateway, products, mail_dir
):
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    # given: copy B of task A's message holds the claim as attempt 0, sending slowly;
    # copy A's attempt 0 had failed to send and given the claim back, so A retries
    Receipt.objects.update(status="sending", claimed_by="task-A/0", claimed_at=timezone.now())

    # when: within the lease, another task, another copy of attempt 0, and A's attempt 1
    receipt_send(order_id=payment.order_id, claimant="task-B")
    receipt_send(order_id=payment.order_id, claimant="task-A", attempt=0)
    receipt_send(order_id=payment.order_id, claimant="task-A", attempt=1)

    # then: they all left it to its live holder (no error, no retry budget, nothing sent)
    assert Receipt.objects.get().status == "sending"
    assert mails_with(mail_dir, "<receipt-") == 0


def receipt_claimed_by_task_a() -> int:
    """A paid order whose receipt attempt 0 of task A claimed; the order's id."""
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    Receipt.objects.update(status="sending", claimed_by="task-A/0", claimed_at=timezone.now())
    return payment.order_id


def worker_retries_task_a(order_id: int, exc: Exception) -> None:
    """What the worker does when it retries attempt 0 (Celery's task_retry signal)."""
    task_retry.send(
        sender=send_receipt,
        request=Context(id="task-A", retries=0, args=[order_id]),
        reason=Retry(exc=exc),
    )


@pytest.mark.django_db(transaction=True)
def test_a_dead_childs_claim_is_given_back_so_its_retry_sends_at_once(
    broker, gateway, products, mail_dir
):
    order_id = receipt_claimed_by_task_a()

    # when: attempt 0's pool child died, and the worker retries it for the lost child
    worker_retries_task_a(order_id, WorkerLostError("child died"))
    receipt_send(order_id=order_id, claimant="task-A", attempt=1)

    receipt = Receipt.objects.get()
    assert (receipt.status, receipt.claimed_by) == ("sent", "task-A/1")
    assert mails_with(mail_dir, receipt.message_id) == 1


@pytest.mark.django_db(transaction=True)
def test_an_ordinary_retry_gives_back_no_claim(broker, gateway, products):
    order_id = receipt_claimed_by_task_a()

    worker_retries_task_a(order_id, TransientError("smtp down"))

    assert Receipt.objects.get().status == "sending"  # its holder is alive: no release


@pytest.mark.django_db(transaction=True)
def test_a_failed_send_gives_its_own_claim_back_and_an_expired_lease_is_anyones(
    broker, gateway, products, mail_dir, settings
):
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    settings.EMAIL_BACKEND = "tests.fault_email.RefusingBackend"

    with pytest.raises(TransientError, match="sending the receipt failed"):
        receipt_send(order_id=payment.order_id, claimant="task-A")
    assert Receipt.objects.get().status == "pending"  # given back: anyone may send it
    # a stale claim of another delivery is not given back by a failing send
    stale = timezone.now() - timedelta(minutes=5)
    Receipt.objects.update(status="sending", claimed_by="task-Z/0", claimed_at=stale)
    with pytest.raises(TransientError):
        receipt_send(order_id=payment.order_id, claimant="task-B")
    assert Receipt.objects.get().status == "pending"  # task-B had taken the expired claim

    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    Receipt.objects.update(status="sending", claimed_by="task-Z/0", claimed_at=stale)
    receipt_send(order_id=payment.order_id, claimant="task-C")

    receipt = Receipt.objects.get()
    assert (receipt.status, receipt.claimed_by, receipt.attempts) == ("sent", "task-C/0", 3)
    assert receipt.unconfirmed_sends == 2  # two expired claims taken over: unknown outcomes
    assert mails_with(mail_dir, receipt.message_id) == 1


@pytest.mark.django_db(transaction=True)
def test_another_delivery_takes_over_a_claim_whose_lease_expired_but_not_a_live_one(
    broker, gateway, products, mail_dir
):
    order_id = receipt_claimed_by_task_a()

    # when: another delivery comes while task A's lease is live
    receipt_send(order_id=order_id, claimant="task-B")
    # then: it leaves the receipt to task A
    receipt = Receipt.objects.get()
    assert (receipt.status, receipt.claimed_by, receipt.attempts) == ("sending", "task-A/0", 0)
    assert mails_with(mail_dir, receipt.message_id) == 0

    # when: the lease has run out (task A's worker died holding the claim)
    Receipt.objects.update(claimed_at=timezone.now() - CLAIM_LEASE - timedelta(seconds=1))
    receipt_send(order_id=order_id, claimant="task-B")

    # then: task B took the claim over and sent it; whether task A's mail went is unknown
    receipt.refresh_from_db()
    assert (receipt.status, receipt.claimed_by, receipt.attempts) == ("sent", "task-B/0", 1)
    assert receipt.unconfirmed_sends == 1
    assert mails_with(mail_dir, receipt.message_id) == 1


@pytest.mark.django_db(transaction=True)
def test_a_claim_stays_live_for_its_60_s_lease_longer_than_the_tasks_hard_time_limit(
    broker, gateway, products, mail_dir, monkeypatch
):
    assert send_receipt.time_limit < 60  # a claim this old: its holder's run has ended
    order_id = receipt_claimed_by_task_a()
    now = timezone.now()  # the clock the sends read, held still: no margin to outrun
    monkeypatch.setattr(receipts.timezone, "now", lambda: now)

    Receipt.objects.update(claimed_at=now - timedelta(seconds=59.5))
    receipt_send(order_id=order_id, claimant="task-B")
    assert Receipt.objects.get().claimed_by == "task-A/0"  # live: left to task A

    Receipt.objects.update(claimed_at=now - timedelta(seconds=60.5))
    receipt_send(order_id=order_id, claimant="task-B")
    assert Receipt.objects.get().claimed_by == "task-B/0"  # expired: taken over


@pytest.mark.django_db(transaction=True)
def test_a_failed_send_puts_the_receipt_back_to_pending_so_a_later_send_sends_it(
    broker, gateway, products, mail_dir, settings
):
    payment = place_order()
    payment_charge(payment_id=payment.pk)
    settings.EMAIL_BACKEND = "tests.fault_email.RefusingBackend"

    # when: the mail server refuses task A's send
    with pytest.raises(TransientError, match="sending the receipt failed"):
        receipt_send(order_id=payment.order_id, claimant="task-A")

    # then: the claim is given back at once, not left to run out its lease
    receipt = Receipt.objects.get()
    assert (receipt.status, receipt.claimed_at, receipt.attempts) == ("pending", None, 1)

    # when: the mail server is back and the task's retry comes, well within the lease
    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    receipt_send(order_id=payment.order_id, claimant="task-A", attempt=1)

    # then: sent once; the failed send said so, so it is no possible duplicate
    receipt.refresh_from_db()
    assert (receipt.status, receipt.claimed_by, receipt.attempts) == ("sent", "task-A/1", 2)
    assert receipt.unconfirmed_sends == 0
    assert mails_with(mail_dir, receipt.message_id) == 1


@pytest.mark.django_db(transaction=True)
def test_a_send_that_failed_and_said_so_is_no_possible_duplicate_a_dead_claim_is(
    broker, gateway, products, mail_dir, settings
):
    from shop.reconcile import receipt_resent

    failed_then_sent, released = place_order(), place_order()
    for payment in (failed_then_sent, released):
        payment_charge(payment_id=payment.pk)
    settings.EMAIL_BACKEND = "tests.fault_email.RefusingBackend"
    with pytest.raises(TransientError):
        receipt_send(order_id=failed_then_sent.order_id, claimant="task-A")
    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    receipt_send(order_id=failed_then_sent.order_id, claimant="task-A", attempt=1)
    # a delivery that died holding its claim: the worker gives it back (receipt_release)
    Receipt.objects.filter(order_id=released.order_id).update(
        status="sending", claimed_by="task-B/0", claimed_at=timezone.now()
    )
    assert receipt_release(order_id=released.order_id, claimant="task-B", attempt=0)
    receipt_send(order_id=released.order_id, claimant="task-B", attempt=1)

    found = receipt_resent(repair=False)

    assert Receipt.objects.get(order_id=failed_then_sent.order_id).attempts == 2
    assert (found.found, found.samples) == (1, [f"order {released.order_id}"])


@pytest.mark.django_db
def test_a_charge_description_names_its_order_and_nothing_else_does(products):
    order = place_order().order

    assert order_number(charge_description(order)) == order.pk
    assert order_number(f"Order #{order.pk}") == order.pk  # as a ledger may shorten it
    assert order_number("Refund #12") is None
    assert order_number("Order #12a") is None


@pytest.mark.django_db(transaction=True)
def test_with_the_breaker_open_a_charge_is_deferred_and_the_gateway_never_called(
    broker, gateway, products
):
    payment = place_order()
    for _ in range(5):  # failures in a row (BREAKER_FAILURES)
        GATEWAY.failed()
    received = gateway.stats()["totals"]["received"]

    with pytest.raises(Deferred) as deferred:
        payment_charge(payment_id=payment.pk)

    assert deferred.value.reason == "breaker_open"
    assert gateway.stats()["totals"]["received"] == received
    payment.refresh_from_db()
    # Put back as it was: the next attempt charges without asking the gateway first.
    assert payment.status == Payment.Status.PENDING
    assert Order.objects.get().status == Order.Status.PENDING


@pytest.mark.django_db(transaction=True)
def test_a_429_defers_the_charge_holds_every_caller_back_and_is_no_outage(
    broker, gateway, products, settings, monkeypatch
):
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(dependencies, "_sleep", sleep)
    settings.JOBS_DEPENDENCIES = {"gateway": {}}  # no limit of our own: the gateway's says no
    gateway.control(rate_limit=1)
    first, second = place_order(), place_order()
    time.sleep(math.ceil(time.time()) - time.time() + 0.01)  # a clock second just began
    payment_charge(payment_id=first.pk)

    with pytest.raises(Deferred) as deferred:
        payment_charge(payment_id=second.pk)  # the same clock second: the gateway's 429

    assert deferred.value.reason == "throttled"
    second.refresh_from_db()
    assert second.status == Payment.Status.PENDING
    assert GATEWAY.state()["state"] == "closed"  # a limit is not an outage
    gateway.control(rate_limit=None)
    assert gateway.ledger(str(second.idempotency_key)) == []

    payment_charge(payment_id=second.pk)  # waits out the Retry-After (1 s), then charges

    assert len(waits) == 1
    assert 0.5 < waits[0] <= 1.0  # the pause began at the 429, a moment ago
    second.refresh_from_db()
    assert second.status == Payment.Status.CHARGED


@pytest.mark.django_db(transaction=True)
def test_a_mail_server_that_refuses_connections_opens_its_breaker_and_sends_are_deferred(
    broker, gateway, products, settings
):
    settings.EMAIL_BACKEND = "jobs.mail.DeadlineSMTPBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens
    orders = []
    for _ in range(5):
        payment = place_order(GOOD)
        payment_charge(payment_id=payment.pk)
        orders.append(payment.order_id)

    for order_id in orders[:-1]:  # four refused connections: BREAKER_FAILURES is five
        with pytest.raises(TransientError, match="sending the receipt failed"):
            receipt_send(order_id=order_id)
    assert MAIL.state()["state"] == "closed"
    with pytest.raises(TransientError, match="sending the receipt failed"):
        receipt_send(order_id=orders[-1])
    assert MAIL.state()["state"] == "open"

    with pytest.raises(Deferred) as deferred:
        receipt_send(order_id=orders[0])

    assert deferred.value.reason == "breaker_open"
    receipt = Receipt.objects.get(order_id=orders[0])
    assert (receipt.status, receipt.attempts) == (Receipt.Status.PENDING, 1)  # not claimed


def test_only_failures_of_the_mail_server_count_towards_its_breaker():
    import smtplib

    assert _mail_server_failed(ConnectionRefusedError())
    assert _mail_server_failed(smtplib.SMTPServerDisconnected("gone"))
    assert _mail_server_failed(smtplib.SMTPResponseException(421, b"try again later"))
    assert not _mail_server_failed(smtplib.SMTPResponseException(550, b"no such user"))
    # every 4xx reply, and nothing else, is the server's "try again later"
    for code, transient in ((399, False), (400, True), (499, True), (500, False)):
        assert _mail_server_failed(smtplib.SMTPResponseException(code, b"")) == transient, code
    assert not _mail_server_failed(smtplib.SMTPRecipientsRefused({"a@b.co": (550, b"no")}))
    assert not _mail_server_failed(ValueError("a template error"))


def open_then_due_for_a_probe(dependency, settings) -> None:
    """The dependency's breaker opened by one failure, its short cooldown over."""
    settings.JOBS_DEPENDENCIES = {dependency.name: {"failures": 1, "cooldown": 0.2}}
    dependency.failed()
    assert dependency.state()["state"] == "open"
    time.sleep(0.3)


@pytest.mark.django_db(transaction=True)
def test_a_probe_with_no_time_left_to_call_hands_the_probe_on(broker, gateway, settings):
    open_then_due_for_a_probe(GATEWAY, settings)
    received = gateway.stats()["totals"]["received"]

    with deadline.running(0.001):
        time.sleep(0.01)  # the run's time is spent: admitted as the probe, it cannot call
        with pytest.raises(deadline.RunOutOfTime):
            gateway_client.charge_create(
                card_token=GOOD,
                amount=Decimal("1.00"),
                currency="EUR",
                idempotency_key="k",
                description="d",
            )

    assert gateway.stats()["totals"]["received"] == received  # nothing was sent
    GATEWAY.admit()  # the next caller is the probe, not deferred until the probe times out
    assert GATEWAY.state()["state"] == "half_open"


@pytest.mark.django_db(transaction=True)
def test_a_probe_that_finds_the_receipt_claimed_hands_the_probe_on(
    broker, gateway, products, settings
):
    payment = place_order(GOOD)
    payment_charge(payment_id=payment.pk)
    Receipt.objects.filter(order_id=payment.order_id).update(
        status=Receipt.Status.SENDING, claimed_at=timezone.now(), claimed_by="other/0"
    )
    open_then_due_for_a_probe(MAIL, settings)

    receipt_send(order_id=payment.order_id, claimant="me")  # the probe: the claim is live

    MAIL.admit()  # the next send probes, not deferred until the probe times out
    assert MAIL.state()["state"] == "half_open"


@pytest.mark.django_db(transaction=True)
def test_the_http_client_is_built_before_the_call_takes_its_turn(broker, gateway, monkeypatch):
    # Building one loads the TLS certificates (tens of ms, more on a busy host): done
    # after the turn, it would delay the call past its slot and bunch calls up at the
    # gateway, which counts them as they arrive.
    monkeypatch.setattr(gateway_client, "_clients", {})
    ready_at_turn: list[bool] = []
    admit = GATEWAY.admit

    def turn() -> None:
        ready_at_turn.append(bool(gateway_client._clients))
        admit()

    monkeypatch.setattr(GATEWAY, "admit", turn)
    gateway_client.charge_find(description="Order #1")

    assert ready_at_turn == [True]
