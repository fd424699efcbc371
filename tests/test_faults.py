"""Crashes at the worst moments, on real processes, judged by external witnesses: the
gateway's ledger, the mail folder, Redis's own `unacked` structures.

The visibility timeout is "shortened for the test" by restoring unacked messages with a
zero timeout from the test process (RedisServer.restore_unacked): exactly what a
worker's periodic sweep does once the real timeout has passed.
"""

import json
from pathlib import Path

import pytest
from django_celery_results.models import TaskResult

from jobs import app
from jobs.models import DeadLetter
from shop.models import Payment, Receipt
from tests.processes import Worker, wait_until
from tests.shop.test_end_to_end import mails_with, place_order, wait_for_receipt

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def started(worker: Worker, task_name: str) -> bool:
    """The worker logged the task's `started` event (its first line is about to run)."""
    for line in worker.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if (record.get("event"), record.get("task_name")) == ("started", task_name):
                return True
    return False


def test_a_whole_worker_killed_mid_charge_is_replaced_and_the_card_is_charged_once(
    client, broker, gateway, worker_env, worker_logs, mail_dir, products
):
    emails = Worker("emails", worker_env, worker_logs).start()
    payments = Worker("payments", worker_env, worker_logs).start()
    try:
        emails.wait_ready()
        payments.wait_ready()
        gateway.control(latency_ms=1500)  # the charge is in flight for 1.5 s
        order_id = place_order(client)
        wait_until(
            lambda: started(payments, "shop.tasks.payments.charge_payment"),
            timeout=20,
            what="the charge",
        )

        # when: the whole payments worker dies mid-charge (an OOM kill of the container)
        payments.kill()
        assert broker.unacked() == 1  # the message is neither lost nor acked
        assert broker.restore_unacked() == 1  # the visibility timeout passes
        replacement = Worker("payments", worker_env, worker_logs).start()
        try:
            # then: the new worker charges with the same idempotency key: once
            body = wait_for_receipt(client, order_id, timeout=60)
        finally:
            replacement.stop()
    finally:
        payments.kill()
        emails.stop()

    assert body["payment"]["status"] == "charged"
    payment = Payment.objects.get(order_id=order_id)
    assert len(gateway.ledger(str(payment.idempotency_key))) == 1
    assert broker.unacked() == 0
    assert not DeadLetter.objects.exists()


def test_a_child_killed_between_sending_and_marking_leaves_one_receipt_and_one_message_id(
    client, broker, gateway, worker_env, worker_logs, mail_dir, products, tmp_path
):
    env = worker_env | {
        "EMAIL_BACKEND": "tests.fault_email.KillAfterFirstSendBackend",
        "FAULT_MARKER": str(tmp_path / "killed"),
    }
    emails = Worker("emails", env, worker_logs).start()
    payments = Worker("payments", worker_env, worker_logs).start()
    try:
        emails.wait_ready()
        payments.wait_ready()

        order_id = place_order(client)

        wait_for_receipt(client, order_id, timeout=60)
    finally:
        emails.stop()
        payments.stop()

    assert (tmp_path / "killed").exists()  # the crash did happen, after a send
    receipt = Receipt.objects.get(order_id=order_id)
    assert receipt.attempts == 2
    mails = list(mail_dir.iterdir())
    assert len(mails) == 2  # sent, crashed before marking, sent again by the retry...
    assert mails_with(mail_dir, receipt.message_id) == 2  # ...with the same Message-ID
    assert not DeadLetter.objects.exists()


def test_warm_shutdown_finishes_the_running_task_and_acks_it(
    broker, worker_env, worker_logs, tmp_path
):
    log = tmp_path / "slow"
    worker = Worker("default", worker_env, worker_logs, include="tests.fault_tasks").start()
    worker.wait_ready()
    task_id = app.send_task("tests.fault_tasks.slow", args=[str(log), 2.0]).id
    wait_until(lambda: Path(log).exists(), timeout=20, what="the task to start")

    # when: the worker is asked to stop (SIGTERM) while the task runs
    code = worker.stop(timeout=30)

    # then: it waited for the task, which finished and was acked
    assert code == 0
    assert log.read_text().splitlines()[-1] == "finished"
    assert len(attempts_started(log)) == 1
    assert TaskResult.objects.get(task_id=task_id).status == "SUCCESS"
    assert broker.unacked() == 0
    assert broker.queue_lengths()["default"] == 0


def attempts_started(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line != "finished"]


def test_what_the_visibility_check_prevents_a_countdown_past_the_timeout_runs_twice(
    broker, worker_env, worker_logs, tmp_path
):
    """jobs.E001 refuses retry delays and time limits near the visibility timeout. Here
    is why: a worker holds a countdown task unacked until its ETA; once the visibility
    timeout passes first, Redis hands the same message to a worker again."""
    log = tmp_path / "slow"
    worker = Worker(
        "default", worker_env, worker_logs, concurrency=2, include="tests.fault_tasks"
    ).start()
    try:
        worker.wait_ready()
        app.send_task("tests.fault_tasks.slow", args=[str(log), 1.0], countdown=3)
        wait_until(lambda: broker.unacked() == 1, timeout=10, what="the ETA task to be held")

        # when: the visibility timeout (shorter than the countdown) passes
        assert broker.restore_unacked() == 1

        # then: the same task runs twice, in parallel, at its ETA
        wait_until(lambda: log.exists() and log.read_text().count("finished") == 2, timeout=20)
    finally:
        worker.stop()
    assert len(attempts_started(log)) == 2
