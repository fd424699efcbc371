"""Crashes at the worst moments, on real processes, judged by external witnesses: the
gateway's ledger, the mail folder, Redis's own `unacked` structures.

The visibility timeout is "shortened for the test" by restoring unacked messages with a
zero timeout from the test process (RedisServer.restore_unacked): exactly what a
worker's periodic sweep does once the real timeout has passed.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jobs import app, outbox
from jobs.models import DeadLetter, OutboxMessage
from shop.models import Payment, Receipt
from shop.services.checkout import checkout_complete, checkout_parse
from shop.services.payments import payment_charge
from tests.helpers import mails_with, place_order, wait_for_receipt, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


@contextmanager
def outbox_paused() -> Iterator[None]:
    """After-commit publishing off: rows stay unsent for the test to publish by hand."""
    outbox._paused_until = time.monotonic() + 3600
    try:
        yield
    finally:
        assert outbox.wait_published()  # rows handed over while paused stay unsent
        outbox.resume_publishing()


def place_charged_order() -> Payment:
    request = checkout_parse(
        {
            "email": "ada@example.com",
            "card_token": "tok_visa",
            "items": [{"sku": "MUG", "quantity": 1}],
        }
    )
    payment = checkout_complete(request=request).order.payment
    payment_charge(payment_id=payment.pk)
    return payment


def test_a_whole_worker_killed_mid_charge_is_replaced_and_the_card_is_charged_once(
    client, broker, gateway, start_worker, mail_dir, products
):
    emails = start_worker("emails", ready=False)
    payments = start_worker("payments", ready=False)
    emails.wait_ready()
    payments.wait_ready()
    gateway.control(latency_ms=8000)  # the gateway answers a charge 8 s after it came
    charges = gateway.stats()["totals"]["charges"]
    order_id = place_order(client)
    key = str(Payment.objects.get(order_id=order_id).idempotency_key)
    wait_until(
        lambda: gateway.stats()["totals"]["charges"] > charges,
        timeout=20,
        what="the charge at the gateway",
    )

    # when: the whole payments worker dies mid-charge (an OOM kill of the container)
    payments.kill()
    # (inside the window: the gateway has the request and has not answered it yet)
    assert gateway.ledger(key) == []
    gateway.control(latency_ms=0)
    assert broker.unacked() == 1  # the message is neither lost nor acked
    assert broker.restore_unacked() == 1  # the visibility timeout passes
    start_worker("payments", ready=False)  # the replacement

    # then: the new worker charges with the same idempotency key: once
    body = wait_for_receipt(client, order_id, timeout=60)
    start_worker.stop_all()

    assert body["payment"]["status"] == "charged"
    payment = Payment.objects.get(order_id=order_id)
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1
    assert broker.unacked() == 0
    assert not DeadLetter.objects.exists()


def test_a_child_killed_between_sending_and_marking_leaves_one_receipt_and_one_message_id(
    client, broker, gateway, start_worker, worker_env, mail_dir, products, tmp_path
):
    env = worker_env | {
        "EMAIL_BACKEND": "tests.fault_email.KillAfterFirstSendBackend",
        "FAULT_MARKER": str(tmp_path / "killed"),
    }
    emails = start_worker("emails", env=env, ready=False)
    payments = start_worker("payments", ready=False)
    emails.wait_ready()
    payments.wait_ready()

    order_id = place_order(client)

    wait_for_receipt(client, order_id, timeout=60)
    start_worker.stop_all()

    assert (tmp_path / "killed").exists()  # the crash did happen, after a send
    receipt = Receipt.objects.get(order_id=order_id)
    assert (receipt.attempts, receipt.unconfirmed_sends) == (2, 1)  # the dead child's claim
    mails = list(mail_dir.iterdir())
    assert len(mails) == 2  # sent, crashed before marking, sent again by the retry...
    assert mails_with(mail_dir, receipt.message_id) == 2  # ...with the same Message-ID
    assert not DeadLetter.objects.exists()


def test_two_live_copies_of_one_receipt_message_send_one_mail(
    broker, gateway, start_worker, worker_env, mail_dir, products
):
    # given: a paid order whose send_receipt row is published twice (the relay and the
    # after-commit publisher both sent it), and a mail server that takes 2 s to answer
    env = worker_env | {"EMAIL_BACKEND": "tests.fault_email.SlowBackend", "FAULT_MAIL_DELAY": "2"}
    emails = start_worker("emails", env=env, concurrency=2)
    with outbox_paused():
        payment = place_charged_order()
    row = OutboxMessage.objects.get(task_name="shop.tasks.emails.send_receipt")
    outbox._send(row)
    outbox._send(row)

    # when: both copies run at once, one in each pool child
    wait_until(
        lambda: Receipt.objects.filter(order_id=payment.order_id, status="sent").exists(),
        timeout=30,
        what="the receipt",
    )
    wait_until(lambda: broker.unacked() == 0, timeout=30, what="both copies acked")
    emails.stop()

    # then: one mail; the second copy saw the live claim and left it
    receipt = Receipt.objects.get(order_id=payment.order_id)
    assert mails_with(mail_dir, receipt.message_id) == 1
    assert receipt.attempts == 1
    assert len(emails.events("started", "shop.tasks.emails.send_receipt")) == 2  # first line ran
    assert not DeadLetter.objects.exists()


def test_warm_shutdown_finishes_the_running_task_and_acks_it(broker, start_worker, tmp_path):
    log = tmp_path / "slow"
    worker = start_worker("default", include="tests.fault_tasks")
    task_id = app.send_task("tests.fault_tasks.slow", args=[str(log), 2.0]).id
    wait_until(lambda: Path(log).exists(), timeout=20, what="the task to start")

    # when: the worker is asked to stop (SIGTERM) while the task runs
    code = worker.stop(timeout=30)

    # then: it waited for the task, which finished and was acked
    assert code == 0
    assert log.read_text().splitlines()[-1] == "finished"
    assert len(attempts_started(log)) == 1
    assert worker.succeeded(task_id)
    assert broker.unacked() == 0
    assert broker.queue_lengths()["default"] == 0


def attempts_started(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line != "finished"]


def test_what_the_visibility_check_prevents_a_countdown_past_the_timeout_runs_twice(
    broker, start_worker, tmp_path
):
    """jobs.E001 refuses retry delays and time limits near the visibility timeout. Here
    is why: a worker holds a countdown task unacked until its ETA; once the visibility
    timeout passes first, Redis hands the same message to a worker again."""
    log = tmp_path / "slow"
    start_worker("default", concurrency=2, include="tests.fault_tasks")
    app.send_task("tests.fault_tasks.slow", args=[str(log), 1.0], countdown=3)
    wait_until(lambda: broker.unacked() == 1, timeout=10, what="the ETA task to be held")

    # when: the visibility timeout (shorter than the countdown) passes
    assert broker.restore_unacked() == 1

    # then: the same task runs twice, in parallel, at its ETA
    wait_until(lambda: log.exists() and log.read_text().count("finished") == 2, timeout=20)
    assert len(attempts_started(log)) == 2
