"""/metrics reads the broker and the database at scrape time: queue depth and oldest age
on every priority list, unacked deliveries, consumers, dead letters, outbox backlog."""

import time
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection

from jobs import app, metrics, outbox
from jobs.dependencies import Dependency
from jobs.models import DeadLetter, OutboxMessage
from tests.helpers import scrape, value

CHARGE = "shop.tasks.payments.charge_payment"


@pytest.mark.django_db(transaction=True)
def test_queue_depth_and_oldest_age_count_every_priority_list(client, broker):
    outbox.enqueue(CHARGE, args=[1])
    time.sleep(0.3)
    outbox.enqueue(CHARGE, args=[2])
    assert outbox.wait_published()
    from jobs import app

    app.send_task(CHARGE, args=[3], priority=9)  # lands on the `payments\x06\x169` list

    samples = scrape(client)

    assert value(samples, "jobs_queue_depth", queue="payments") == 3
    assert value(samples, "jobs_queue_depth", queue="emails") == 0
    assert 0.3 <= value(samples, "jobs_queue_oldest_age_seconds", queue="payments") < 30
    assert value(samples, "jobs_tasks_enqueued_total", task=CHARGE, queue="payments") >= 2
    assert value(samples, "jobs_scrape_errors", part="queues") == 0


@pytest.mark.django_db(transaction=True)
def test_unacked_deliveries_are_counted_per_queue_with_their_age(client, broker):
    outbox.enqueue(CHARGE, args=[1])
    assert outbox.wait_published()
    with Connection(broker.url) as conn:
        message = conn.default_channel.basic_get("payments", no_ack=False)  # taken, not acked
        assert message is not None
        time.sleep(0.2)

        samples = scrape(client)

    assert value(samples, "jobs_unacked", queue="payments") == 1
    assert value(samples, "jobs_queue_depth", queue="payments") == 0
    assert value(samples, "jobs_unacked_oldest_age_seconds", queue="payments") >= 0.2


@pytest.fixture
def short_health_checks() -> Iterator[float]:
    """This process's broker connections check their health every second, not every 25:
    what a web process sees after 25 idle seconds, a test sees after a few."""
    before = app.conf.broker_transport_options
    app.conf.broker_transport_options = {**before, "health_check_interval": 1}
    app._pool = None  # the next connection from the pool is one with these options
    yield 1.0
    app.conf.broker_transport_options = before
    app._pool = None


@pytest.mark.django_db(transaction=True)
def test_consumers_are_still_counted_after_the_broker_restarted(
    client, broker, start_worker, short_health_checks
):
    worker = start_worker("payments")
    assert value(scrape(client), "jobs_queue_consumers", queue="payments") == 1

    # when: the broker restarts (an upgrade, a failover), the worker reconnects, and this
    # process's connections sit idle past their health-check interval
    with broker.down():
        pass
    worker.wait_ready()
    time.sleep(2 * short_health_checks)

    # then: the worker's answer is read (a pooled connection once left it unread in Redis
    # for good, and every queue read "no consumers" until the web process restarted)
    metrics._consumers_cache = (0.0, {})
    assert value(scrape(client), "jobs_queue_consumers", queue="payments") == 1


@pytest.mark.django_db(transaction=True)
def test_dead_letters_and_outbox_backlog_are_reported(client, broker):
    DeadLetter.objects.create(task_id=str(uuid.uuid4()), task_name=CHARGE, reason="poison")
    with broker.down():
        outbox.enqueue(CHARGE, args=[1])  # stays unsent: the broker is down

        down = scrape(client)

    assert value(down, "jobs_dead_letters", reason="poison", status="dead") == 1
    assert value(down, "jobs_outbox_unsent") == 1
    assert value(down, "jobs_outbox_oldest_unsent_age_seconds") >= 0
    assert value(down, "jobs_scrape_errors", part="queues") == 1  # said, not a 500
    assert OutboxMessage.objects.filter(sent_at__isnull=True).count() == 1


@pytest.mark.django_db
def test_each_dependencys_breaker_state_and_rate_limit_are_reported(client, broker, settings):
    settings.JOBS_DEPENDENCIES = {"gateway": {"rate": 50.0, "failures": 1}, "mail": {}}
    Dependency("gateway").failed()

    samples = scrape(client)

    assert value(samples, "jobs_dependency_breaker_state", dependency="gateway", state="open") == 1
    for state in ("closed", "half_open"):
        labels = {"dependency": "gateway", "state": state}
        assert value(samples, "jobs_dependency_breaker_state", **labels) == 0
    assert value(samples, "jobs_dependency_breaker_state", dependency="mail", state="closed") == 1
    assert value(samples, "jobs_dependency_rate_limit", dependency="gateway") == 50
    assert value(samples, "jobs_dependency_rate_limit", dependency="mail") == 0
    assert value(samples, "jobs_scrape_errors", part="dependencies") == 0
