"""The broker restarts mid-run. With AOF (as deployed) nothing queued is lost. Without
persistence the queued messages are gone, and the reconciler gets the orders done."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from jobs.models import DeadLetter
from jobs.reconcile import reconciler
from shop.models import Order, Payment
from tests.processes import QUEUES, RedisServer, Worker
from tests.shop.test_end_to_end import place_order, wait_for_receipt

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
    time.sleep(1.5)  # past one appendfsync everysec
    broker.crash()
    broker.start()
    return orders


@contextmanager
def workers_running(env, logs) -> Iterator[None]:
    workers = [Worker(queue, env, logs).start() for queue in QUEUES if queue != "reports"]
    try:
        for worker in workers:
            worker.wait_ready()
        yield
    finally:
        for worker in workers:
            worker.stop()


def assert_each_order_paid_and_charged_once(client, gateway, orders: list[int]) -> None:
    for order_id in orders:
        assert wait_for_receipt(client, order_id)["payment"]["status"] == "charged"
    for payment in Payment.objects.all():
        assert len(gateway.ledger(str(payment.idempotency_key))) == 1


def test_with_aof_a_broker_crash_loses_nothing(
    client, restartable_broker, gateway, worker_env, worker_logs, mail_dir, products
):
    restartable_broker.extra = ("--appendonly", "yes", "--appendfsync", "everysec")
    restartable_broker.start()

    orders = run_orders_through_a_broker_crash(client, restartable_broker, 3)

    assert restartable_broker.queue_lengths()["payments"] == 3  # replayed from the AOF
    with workers_running(worker_env, worker_logs):
        assert_each_order_paid_and_charged_once(client, gateway, orders)


def test_without_persistence_the_reconciler_recovers_what_the_broker_lost(
    client, restartable_broker, gateway, worker_env, worker_logs, mail_dir, products, settings
):
    restartable_broker.start()  # no AOF, no snapshots: a cache, not a broker

    orders = run_orders_through_a_broker_crash(client, restartable_broker, 3)

    # the messages are gone, and the outbox rows say "sent": the relay cannot know
    assert restartable_broker.queue_lengths()["payments"] == 0
    with workers_running(worker_env, worker_logs):
        assert set(Order.objects.values_list("status", flat=True)) == {"pending"}
        # the reconciler looks at outcomes: payments still pending are charged again
        settings.RECONCILE_AFTER_MINUTES = 0
        reconciler.run(repair=True)
        assert_each_order_paid_and_charged_once(client, gateway, orders)
    assert not DeadLetter.objects.exists()
