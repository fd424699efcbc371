"""The broker restarts mid-run. With AOF (as deployed) nothing queued is lost. Without
persistence the queued messages are gone, and the reconciler gets the orders done."""

import time
from collections.abc import Iterator

import pytest

from jobs.models import DeadLetter
from jobs.reconcile import reconciler
from shop.models import Order, Payment
from tests.helpers import (
    QUEUES,
    RedisServer,
    WorkerStarter,
    place_order,
    wait_for_receipt,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def restartable_broker(redis_server: RedisServer, tmp_path) -> Iterator[RedisServer]:
    """The session's Redis, restarted in a fresh folder; as it was afterwards."""
    directory, extra = redis_server.directory, redis_server.extra
    redis_server.stop()
    redis_server.directory = tmp_path
    yield redis_server
    redis_server.stop()
    redis_server.directory, redis_server.extra = directory, extra
    redis_server.start()


def run_orders_through_a_broker_crash(client, broker, count: int) -> list[int]:
    orders = [place_order(client) for _ in range(count)]
    assert broker.queue_lengths()["payments"] == count  # published, nobody consumes yet
    if broker.client().config_get("appendonly")["appendonly"] == "yes":
        # crash once what was published is in the file (not after a guessed second)
        wait_until(broker.aof_written, timeout=30, what="the AOF written")
    broker.crash()
    broker.start()
    return orders


def start_workers(start_worker: WorkerStarter, queues: list[str] | None = None) -> None:
    """One worker per queue (all but reports by default), started together."""
    queues = queues or [queue for queue in QUEUES if queue != "reports"]
    for worker in [start_worker(queue, ready=False) for queue in queues]:
        worker.wait_ready()


def assert_each_order_paid_and_charged_once(client, gateway, orders: list[int]) -> None:
    for order_id in orders:
        assert wait_for_receipt(client, order_id)["payment"]["status"] == "charged"
    for payment in Payment.objects.all():
        assert len(gateway.ledger(str(payment.idempotency_key))) == 1


def test_with_aof_a_broker_crash_loses_nothing(
    client, restartable_broker, start_worker, gateway, mail_dir, products
):
    restartable_broker.extra = ("--appendonly", "yes", "--appendfsync", "everysec")
    restartable_broker.start()

    orders = run_orders_through_a_broker_crash(client, restartable_broker, 3)

    assert restartable_broker.queue_lengths()["payments"] == 3  # replayed from the AOF
    start_workers(start_worker)
    assert_each_order_paid_and_charged_once(client, gateway, orders)


def test_without_persistence_the_reconciler_recovers_what_the_broker_lost(
    client, restartable_broker, start_worker, gateway, mail_dir, products, settings
):
    restartable_broker.start()  # no AOF, no snapshots: a cache, not a broker

    orders = run_orders_through_a_broker_crash(client, restartable_broker, 3)

    # the messages are gone, and the outbox rows say "sent": the relay cannot know
    assert restartable_broker.queue_lengths()["payments"] == 0
    start_workers(start_worker)
    assert set(Order.objects.values_list("status", flat=True)) == {"pending"}
    # the reconciler looks at outcomes: payments still pending are charged again
    settings.RECONCILE_AFTER_MINUTES = 0
    reconciler.run(repair=True)
    assert_each_order_paid_and_charged_once(client, gateway, orders)
    start_worker.stop_all()
    assert not DeadLetter.objects.exists()


def test_tasks_in_flight_at_a_broker_restart_wait_in_unacked_until_recovered(
    client, restartable_broker, start_worker, gateway, mail_dir, products, settings
):
    """Celery 5.7 terminates a late-ack task whose connection was lost (its ack could not
    reach the new connection) and tries to restore the delivery while the broker is
    down: the message stays in the `unacked` hash until the visibility timeout. The
    reconciler, which looks at outcomes, gets the order done first; charged once."""
    restartable_broker.extra = ("--appendonly", "yes", "--appendfsync", "always")
    restartable_broker.start()
    gateway.control(latency_ms=5000)  # charges in flight (unacked) when Redis goes
    worker = start_worker("payments", concurrency=2)
    orders = [place_order(client) for _ in range(2)]
    wait_until(lambda: restartable_broker.unacked() == 2, timeout=10, what="2 in flight")
    with restartable_broker.down():
        time.sleep(0.5)
    gateway.control(latency_ms=0)

    wait_until(
        lambda: "cannot be acknowledged after a connection loss" in worker.log.read_text(),
        timeout=15,
        what="the in-flight tasks terminated",
    )
    assert restartable_broker.unacked() == 2  # not restored: the broker was down
    assert set(Order.objects.values_list("status", flat=True)) == {"pending"}
    # A new payments worker, as a supervisor would start (see the README: Celery 5.7 may
    # exit here, or any moment now; stopping and replacing it leaves nothing to chance).
    worker.stop()
    start_worker("payments")
    start_workers(start_worker, queues=["emails", "default"])
    settings.RECONCILE_AFTER_MINUTES = 0
    reconciler.run(repair=True)
    assert_each_order_paid_and_charged_once(client, gateway, orders)
